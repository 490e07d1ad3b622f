"""Structural pruning of a stock transformers BERT, and the loader that rebuilds pruned models.

A pruning plan lists, per layer, the attention heads and FFN neurons to keep. Heads leave the
Q/K/V projections (rows) and the attention output projection (columns); neurons leave the first
FFN matrix (rows) and the second (columns). transformers 5 has no `prune_heads` for BERT, but
its self-attention reshapes with `view(..., -1, head_size)`, so a layer with fewer heads runs
unchanged; a layer left with no head gets `NoHeads` (its attention block then adds only the
output bias, as the zero-gated original did). A stock `BertConfig` cannot say how many heads each
layer has, so `load_pruned` reads the plan saved beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

from pipeline.model.gates import SlimmingGates

PLAN = "pruning_plan.json"


class NoHeads(nn.Module):
    """Self-attention with every head pruned: an empty context, shaped like the real one."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    out = nn.Linear(linear.in_features, len(keep), device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.data.copy_(linear.weight.data[keep])
    out.bias.data.copy_(linear.bias.data[keep])
    return out


def _cols(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    out = nn.Linear(len(keep), linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.data.copy_(linear.weight.data[:, keep])
    out.bias.data.copy_(linear.bias.data)
    return out


@torch.no_grad()
def fold_gates(hf: nn.Module, gates: SlimmingGates) -> None:
    """Multiply each gate into the weights it scales, so the model computes the gated function without hooks."""
    for index, layer in enumerate(hf.bert.encoder.layer):
        dense = layer.attention.output.dense
        head_size = dense.in_features // gates.heads.shape[1]
        dense.weight.mul_(gates.heads[index].repeat_interleave(head_size).to(dense.weight.dtype))
        layer.output.dense.weight.mul_(gates.ffn[index].to(layer.output.dense.weight.dtype))


@torch.no_grad()
def prune_model(hf: nn.Module, plan: dict) -> None:
    """Cut the model down to `plan` in place."""
    config = hf.config
    head_size = config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(hf.bert.encoder.layer):
        heads = plan["heads"][index]
        keep = torch.tensor([h * head_size + j for h in heads for j in range(head_size)], dtype=torch.long)
        attention = layer.attention.self
        if heads:
            for name in ("query", "key", "value"):
                setattr(attention, name, _rows(getattr(attention, name), keep))
            attention.num_attention_heads = len(heads)
            attention.all_head_size = len(heads) * head_size
        else:
            layer.attention.self = NoHeads()
        layer.attention.output.dense = _cols(layer.attention.output.dense, keep)
        neurons = torch.tensor(plan["ffn"][index], dtype=torch.long)
        layer.intermediate.dense = _rows(layer.intermediate.dense, neurons)
        layer.output.dense = _cols(layer.output.dense, neurons)


def plan_summary(plan: dict, config: BertConfig) -> dict:
    heads = sum(len(h) for h in plan["heads"])
    neurons = sum(len(f) for f in plan["ffn"])
    layers = config.num_hidden_layers
    return {"heads_kept": heads, "heads_total": layers * config.num_attention_heads,
            "ffn_kept": neurons, "ffn_total": layers * config.intermediate_size,
            "layers_without_heads": sum(1 for h in plan["heads"] if not h),
            "layers_without_ffn": sum(1 for f in plan["ffn"] if not f)}


def save_pruned(hf: nn.Module, plan: dict, directory: Path) -> None:
    directory = Path(directory)
    state = {k: v.detach().float().cpu() for k, v in hf.state_dict().items()}
    hf.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
    (directory / PLAN).write_text(json.dumps(plan) + "\n")


def load_pruned(directory: Path) -> nn.Module:
    """Rebuild a pruned (or unpruned) BERT saved by `save_pruned` / the pretrain export."""
    directory = Path(directory)
    config = BertConfig.from_pretrained(str(directory))
    cls = BertForPreTraining if "BertForPreTraining" in (config.architectures or []) else BertForMaskedLM
    model = cls._from_config(config, attn_implementation="sdpa")
    if (directory / PLAN).exists():
        prune_model(model, json.loads((directory / PLAN).read_text()))
    state = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{directory}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model
