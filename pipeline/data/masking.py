"""Dynamic masking for MLM, vectorised over the whole batch (no per-sequence Python loop).

Chosen positions: each non-special token with probability p (or, with whole-word masking,
each word, with all its pieces; or, with `fixed_count`, exactly round(p x the row's maskable
tokens), the ones with the smallest draws). Of those, 80% become [MASK], 10% a random token, 10% stay.
The random source is a torch.Generator the caller seeds per batch, so a resumed run draws
exactly the masks an uninterrupted one would have drawn.
"""

from __future__ import annotations

import math

import torch

from pipeline.config import MaskingConfig
from pipeline.data.tokenizer import TokenizerInfo

IGNORE = -100  # label of unmasked positions (the loss skips them)


def special_mask(ids: torch.Tensor, info: TokenizerInfo) -> torch.Tensor:
    return (ids == info.pad_id) | (ids == info.cls_id) | (ids == info.sep_id)


def mask_tokens(ids: torch.Tensor, cfg: MaskingConfig, info: TokenizerInfo, gen: torch.Generator,
                continuation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input ids, labels); `ids` is [batch, seq] int64 and is not modified.

    `continuation[v]` says whether token v is a '##' piece; needed for whole-word masking.
    """
    special = special_mask(ids, info)
    draw = torch.rand(ids.shape, generator=gen)
    if cfg.whole_word:
        if continuation is None:
            raise ValueError("whole-word masking needs the vocab's continuation flags")
        after_special = torch.ones_like(special)
        after_special[:, 1:] = special[:, :-1]
        # a word starts at a non-'##' piece, or at a '##' piece cut off from its word by packing
        starts = ~continuation[ids] | special | after_special
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        # each piece takes the draw of the first piece of its word: index of the last start so far
        word_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
        draw = draw.gather(1, word_start)
    if cfg.fixed_count:
        # rank of each position's draw within its row, specials last; the first round(p x n) are chosen
        ranks = draw.masked_fill(special, 2.0).argsort(dim=1).argsort(dim=1)
        count = ((~special).sum(dim=1, keepdim=True) * cfg.probability).round()
        chosen = (ranks < count) & ~special
    else:
        chosen = (draw < cfg.probability) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = torch.rand(ids.shape, generator=gen)
    to_mask = chosen & (action < cfg.replace_mask)
    to_random = chosen & (action >= cfg.replace_mask) & (action < cfg.replace_mask + cfg.replace_random)
    random_ids = torch.randint(info.vocab_size, ids.shape, generator=gen)
    masked = torch.where(to_mask, torch.full_like(ids, info.mask_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def positions_per_row(seq_len: int, probability: float) -> int:
    """The fixed number of masked positions a batch carries per row: a full row's count, rounded up."""
    return max(1, math.ceil(probability * (seq_len - 2)))


def masked_positions(labels: torch.Tensor, count: int) -> torch.Tensor:
    """[batch, count] positions holding every label of each row (in order), padded with unlabelled ones."""
    labelled = (labels != IGNORE).to(torch.int8)
    # stable: labelled positions first, each group in position order
    order = labelled.argsort(dim=1, descending=True, stable=True)[:, :count]
    return order.sort(dim=1).values
