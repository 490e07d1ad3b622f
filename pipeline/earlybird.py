"""Early-bird ticket detection (pure torch): masks from slimming coefficients, Hamming distance, FIFO rule.

Facts followed (EarlyBERT; Early-Bird tickets): a mask keeps the coefficients above the pruning
quantile of |c|, per layer or over all layers; masks are drawn every `check_every` steps; the
ticket has emerged when the newest mask is within normalised Hamming distance `threshold` of
each of the previous `fifo_size - 1` masks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Masks:
    heads: torch.Tensor  # bool [layers, heads]: kept
    ffn: torch.Tensor  # bool [layers, intermediate]: kept

    def flat(self) -> torch.Tensor:
        return torch.cat([self.heads.reshape(-1), self.ffn.reshape(-1)])

    def to_plan(self) -> dict:
        return {"heads": [torch.nonzero(row).squeeze(1).tolist() for row in self.heads],
                "ffn": [torch.nonzero(row).squeeze(1).tolist() for row in self.ffn]}


def keep_mask(coefficients: torch.Tensor, prune_ratio: float, scope: str) -> torch.Tensor:
    """Keep all but the `prune_ratio` smallest |c|: in each row (layerwise) or over all rows (global)."""
    magnitude = coefficients.detach().abs().float()
    if scope == "layerwise":
        drop = int(round(prune_ratio * magnitude.shape[1]))
        order = magnitude.argsort(dim=1, stable=True)
        keep = torch.ones_like(magnitude, dtype=torch.bool)
        keep.scatter_(1, order[:, :drop], False)
        return keep
    drop = int(round(prune_ratio * magnitude.numel()))
    order = magnitude.reshape(-1).argsort(stable=True)
    keep = torch.ones(magnitude.numel(), dtype=torch.bool)
    keep[order[:drop]] = False
    return keep.reshape(magnitude.shape)


def draw_masks(heads: torch.Tensor, ffn: torch.Tensor, head_ratio: float, ffn_ratio: float,
               head_scope: str = "layerwise", ffn_scope: str = "global") -> Masks:
    return Masks(keep_mask(heads, head_ratio, head_scope), keep_mask(ffn, ffn_ratio, ffn_scope))


def random_masks(heads_shape: tuple, ffn_shape: tuple, head_ratio: float, ffn_ratio: float, head_scope: str,
                 ffn_scope: str, seed: int) -> Masks:
    """The ablation baseline: the same number pruned, chosen at random."""
    gen = torch.Generator().manual_seed(seed)
    return draw_masks(torch.rand(heads_shape, generator=gen), torch.rand(ffn_shape, generator=gen), head_ratio,
                      ffn_ratio, head_scope, ffn_scope)


def hamming(a: Masks, b: Masks) -> float:
    """Fraction of gates on which the two masks disagree."""
    fa, fb = a.flat(), b.flat()
    return float((fa != fb).float().mean())


class EarlyBirdDetector:
    """FIFO of the last `fifo_size` masks; `push` says whether the ticket has emerged."""

    def __init__(self, fifo_size: int = 5, threshold: float = 0.1):
        self.fifo: deque[Masks] = deque(maxlen=fifo_size)
        self.threshold = threshold
        self.history: list[float] = []  # max distance from the newest mask to the others, per push

    def push(self, masks: Masks) -> bool:
        self.fifo.append(masks)
        if len(self.fifo) < 2:
            self.history.append(1.0)
            return False
        distance = max(hamming(masks, older) for older in list(self.fifo)[:-1])
        self.history.append(distance)
        return len(self.fifo) == self.fifo.maxlen and distance <= self.threshold
