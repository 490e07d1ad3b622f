"""The parameter groups every optimizer of every stage is built over.

BERT's split (Google's LAMB and BERT code): biases and LayerNorm take no weight decay and no layer
adaptation. EarlyBERT's slimming gates are a group of their own: their only regulariser is the L1
penalty in the loss, so no weight decay, and no trust ratio (a ratio ||w|| / ||u|| over a layer of
gates all near 1 would rescale the L1 push that is meant to drive some of them to 0).
"""

from __future__ import annotations

import torch

from pipeline.model.gates import SlimmingGates


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, plain, gates]; the gates' group only when the model carries gates (`"gates": True`)."""
    gate_ids = {id(p) for module in model.modules() if isinstance(module, SlimmingGates)
                for p in module.parameters()}
    decay, plain, gates = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in gate_ids:
            gates.append(param)
        elif param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name:
            plain.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "trust_ratio": True},
              {"params": plain, "weight_decay": 0.0, "trust_ratio": False}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "trust_ratio": False, "gates": True})
    return groups
