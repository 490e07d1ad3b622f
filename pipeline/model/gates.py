"""Slimming gates (EarlyBERT): one learnable scalar per attention head and per FFN neuron.

Attached to a stock transformers BERT with forward hooks, no library source edited: the head
gate scales that head's slice of the attention output before the output projection (so it
works with SDPA or any attention kernel), the FFN gate scales each intermediate neuron after the
activation. Gates start at 1.0, where the model computes exactly what it computed without them.
"""

from __future__ import annotations

import torch
from torch import nn


class SlimmingGates(nn.Module):
    def __init__(self, num_layers: int, num_heads: int, intermediate: int):
        super().__init__()
        self.heads = nn.Parameter(torch.ones(num_layers, num_heads))
        self.ffn = nn.Parameter(torch.ones(num_layers, intermediate))
        self._handles: list = []

    def attach(self, bert: nn.Module) -> SlimmingGates:
        """Hook every encoder layer of `bert` (a BertModel); returns self."""
        self.detach()
        for index, layer in enumerate(bert.encoder.layer):
            self._handles.append(layer.attention.output.dense.register_forward_pre_hook(self._head_hook(index)))
            self._handles.append(layer.intermediate.register_forward_hook(self._ffn_hook(index)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _head_hook(self, index: int):
        def scale_heads(module: nn.Module, args: tuple) -> tuple:
            context = args[0]  # [batch, seq, heads * head_size]: the heads' outputs side by side
            heads = self.heads[index]
            shaped = context.reshape(*context.shape[:-1], heads.numel(), -1)
            return ((shaped * heads.to(context.dtype).unsqueeze(-1)).reshape(context.shape),) + args[1:]
        return scale_heads

    def _ffn_hook(self, index: int):
        def scale_neurons(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * self.ffn[index].to(output.dtype)
        return scale_neurons

    def l1(self, lambda_heads: float, lambda_ffn: float) -> torch.Tensor:
        return lambda_heads * self.heads.abs().sum() + lambda_ffn * self.ffn.abs().sum()


def gates_for(hf_model: nn.Module) -> SlimmingGates:
    config = hf_model.config
    return SlimmingGates(config.num_hidden_layers, config.num_attention_heads, config.intermediate_size).attach(
        hf_model.bert)
