"""Early-bird ticket detection (pure torch): masks from slimming coefficients, Hamming distance, FIFO rule.

Facts followed (EarlyBERT; Early-Bird tickets): a mask keeps the coefficients above the pruning
quantile of |c|, per layer or over all layers; masks are drawn every `check_every` steps; the
ticket has emerged when the newest mask is within normalised Hamming distance `threshold` of
each of the previous `fifo_size - 1` masks, on the heads and on the FFN neurons separately.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from pipeline.config import SearchConfig


@dataclass(frozen=True)
class Masks:
    heads: torch.Tensor  # bool [layers, heads]: kept
    ffn: torch.Tensor  # bool [layers, intermediate]: kept

    def flat(self) -> torch.Tensor:
        return torch.cat([self.heads.reshape(-1), self.ffn.reshape(-1)])

    def to_plan(self) -> dict:
        return {"heads": [torch.nonzero(row).squeeze(1).tolist() for row in self.heads],
                "ffn": [torch.nonzero(row).squeeze(1).tolist() for row in self.ffn]}


def keep_mask(coefficients: torch.Tensor, prune_ratio: float, scope: str, multiple: int = 1) -> torch.Tensor:
    """Keep all but the `prune_ratio` smallest |c|: in each row (layerwise) or over all rows (global);
    `multiple` > 1: then each row keeps its count rounded to the nearest multiple (see rounded_rows)."""
    magnitude = coefficients.detach().abs().float()
    keep = _keep_mask(magnitude, prune_ratio, scope)
    return keep if multiple == 1 else rounded_rows(magnitude, keep, multiple)


def rounded_rows(magnitude: torch.Tensor, keep: torch.Tensor, multiple: int) -> torch.Tensor:
    """Each row keeps its largest |c|, as many as its kept count rounded to the nearest `multiple`.

    Matrix widths that are multiples of 64 run at the full rate of the GEMM kernels (tensor-core tiles
    on GPUs; on 2 CPU cores a 768 x 1856 FFN ran 176 GFLOP/s against 159 at 1843): a global FFN ticket
    otherwise leaves every layer an odd width. The total kept moves by less than `multiple` / 2 a row.
    """
    counts = keep.sum(dim=1).float()
    target = ((counts / multiple).round() * multiple).clamp(max=magnitude.shape[1]).long()
    order = magnitude.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return rank < target.unsqueeze(1)


def _keep_mask(magnitude: torch.Tensor, prune_ratio: float, scope: str) -> torch.Tensor:
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
               head_scope: str = "layerwise", ffn_scope: str = "global", ffn_multiple: int = 1) -> Masks:
    return Masks(keep_mask(heads, head_ratio, head_scope), keep_mask(ffn, ffn_ratio, ffn_scope, ffn_multiple))


def ticket_masks(rules: SearchConfig, heads: torch.Tensor, ffn: torch.Tensor) -> Masks:
    """The ticket the gates `heads` / `ffn` give under a search config's size rules (ratios, scopes, FFN
    multiple): every mask this project draws, searched or random, comes from here."""
    return draw_masks(heads, ffn, rules.head_prune_ratio, rules.ffn_prune_ratio, rules.head_scope, rules.ffn_scope,
                      rules.ffn_multiple)


def random_masks(rules: SearchConfig, heads_shape: tuple, ffn_shape: tuple, seed: int) -> Masks:
    """The ablation baseline: a ticket under the same size rules, its coefficients drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    return ticket_masks(rules, torch.rand(heads_shape, generator=gen), torch.rand(ffn_shape, generator=gen))


def random_like(ticket: Masks, seed: int) -> Masks:
    """A random ticket with exactly `ticket`'s per-layer head and FFN counts (a global scope spreads a
    random ticket's neurons over the layers otherwise than the searched one's)."""
    gen = torch.Generator().manual_seed(seed)

    def like(kept: torch.Tensor) -> torch.Tensor:
        order = torch.rand(kept.shape, generator=gen).argsort(dim=1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(kept.shape[1]).expand_as(order).contiguous())
        return rank < kept.sum(dim=1, keepdim=True)

    return Masks(like(ticket.heads), like(ticket.ffn))


def hamming(a: Masks, b: Masks) -> tuple[float, float]:
    """Fractions of head gates and of FFN gates on which the two masks disagree, kept apart.

    One distance over all gates would be blind to heads: BERT-base has 144 head gates against 36,864
    FFN gates, so every pruned head could change without moving it by more than 0.4%.
    """
    heads = float((a.heads != b.heads).float().mean()) if a.heads.numel() else 0.0
    ffn = float((a.ffn != b.ffn).float().mean()) if a.ffn.numel() else 0.0
    return heads, ffn


class EarlyBirdDetector:
    """FIFO of the last `fifo_size` masks; `push` says whether the ticket has emerged.

    Emerged: the FIFO is full and the newest mask is within `head_threshold` of every older one on
    the heads and within `ffn_threshold` on the FFN neurons.
    """

    def __init__(self, fifo_size: int = 5, head_threshold: float = 0.1, ffn_threshold: float = 0.1):
        self.fifo: deque[Masks] = deque(maxlen=fifo_size)
        self.head_threshold, self.ffn_threshold = head_threshold, ffn_threshold
        # per push: the largest distance from the newest mask to the older ones (1.0 while alone)
        self.head_history: list[float] = []
        self.ffn_history: list[float] = []

    def push(self, masks: Masks) -> bool:
        self.fifo.append(masks)
        if len(self.fifo) < 2:
            self.head_history.append(1.0)
            self.ffn_history.append(1.0)
            return False
        distances = [hamming(masks, older) for older in list(self.fifo)[:-1]]
        heads, ffn = max(d[0] for d in distances), max(d[1] for d in distances)
        self.head_history.append(heads)
        self.ffn_history.append(ffn)
        full = len(self.fifo) == self.fifo.maxlen
        return full and heads <= self.head_threshold and ffn <= self.ffn_threshold
