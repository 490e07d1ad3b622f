"""EarlyBERT in fine-tuning: the mask cadence, the FIFO rule on a recorded fine-tuning search, the tickets' sizes.

The recording (tests/fixtures/finetune_masks_bbc_minilm.npz) is the mask drawn after every step of a
real search: all-MiniLM-L6-v2 on the 1,721 BBC train articles, batch 32 (54 steps an epoch), lr 2e-5,
L1 1e-4, 1/3 of the heads per layer and 40% of the FFN neurons pruned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import FinetuneConfig, SearchConfig
from pipeline.earlybird import EarlyBirdDetector, Masks, random_like
from pipeline.tasks.earlybert import Ticket, _kept, search_rules

RECORDING = Path(__file__).resolve().parents[1] / "fixtures" / "finetune_masks_bbc_minilm.npz"
STEPS_PER_EPOCH = 54


def _recorded() -> tuple[list[int], list[Masks]]:
    saved = np.load(RECORDING)
    heads = np.unpackbits(saved["heads"], axis=-1, count=int(saved["head_width"])).astype(bool)
    ffn = np.unpackbits(saved["ffn"], axis=-1, count=int(saved["ffn_width"])).astype(bool)
    return saved["steps"].tolist(), [Masks(torch.from_numpy(h), torch.from_numpy(f)) for h, f in zip(heads, ffn)]


def _emergence(rules: SearchConfig) -> int | None:
    """The step the FIFO rule fires at when masks are drawn every `rules.check_every` steps."""
    detector = EarlyBirdDetector(rules.fifo_size, rules.head_distance_threshold, rules.ffn_distance_threshold)
    for step, masks in zip(*_recorded()):
        if step % rules.check_every == 0 and detector.push(masks):
            return step
    return None


def test_masks_drawn_every_ten_steps_cannot_emerge_within_a_short_epoch():
    """The old cadence: the FIFO of 5 spans 40 steps, and over 40 steps the mask still moves by a quarter."""
    steps, masks = _recorded()
    assert len(steps) == STEPS_PER_EPOCH and masks[0].heads.shape == (6, 12) and masks[0].ffn.shape == (6, 1536)
    assert int(masks[-1].heads.sum()) == 6 * 8 and int(masks[-1].ffn.sum()) == round(0.6 * 6 * 1536)
    assert _emergence(SearchConfig(check_every=10)) is None


def test_masks_drawn_a_hundred_times_an_epoch_emerge_within_the_first_epoch():
    cfg = FinetuneConfig(earlybert={"enabled": True})
    rules = search_rules(cfg, "searched", STEPS_PER_EPOCH)
    assert rules.check_every == 1  # 54 steps: at most every step
    emerged = _emergence(rules)
    assert emerged is not None and emerged < STEPS_PER_EPOCH / 2


def test_the_cadence_and_the_fixed_draw_follow_the_epoch():
    cfg = FinetuneConfig(earlybert={"enabled": True, "checks_per_epoch": 50, "fixed_fraction": 0.2})
    assert search_rules(cfg, "searched", 5000).check_every == 100
    fixed = search_rules(cfg, "fixed", 5000)
    assert (fixed.mode, fixed.fixed_step) == ("fixed", 1000)
    steps = FinetuneConfig(earlybert={"enabled": True, "checks_per_epoch": None, "search": {"check_every": 7}})
    assert search_rules(steps, "searched", 5000).check_every == 7


def test_the_random_ticket_has_the_searched_tickets_counts_in_every_layer():
    _, masks = _recorded()
    searched = Ticket(masks[-1].to_plan(), {})
    kept = Masks(_kept(searched.plan["heads"], 12), _kept(searched.plan["ffn"], 1536))
    assert torch.equal(kept.heads, masks[-1].heads) and torch.equal(kept.ffn, masks[-1].ffn)
    drawn = random_like(kept, seed=5)
    assert drawn.heads.sum(1).tolist() == kept.heads.sum(1).tolist()
    assert drawn.ffn.sum(1).tolist() == kept.ffn.sum(1).tolist()
    assert not torch.equal(drawn.ffn, kept.ffn)


@pytest.mark.parametrize("tickets", [["random"], ["searched", "searched"]])
def test_a_random_ticket_needs_the_searched_one_and_tickets_are_unique(tickets):
    with pytest.raises(ValueError, match="tickets"):
        FinetuneConfig(earlybert={"enabled": True, "tickets": tickets})


def test_nothing_to_fine_tune_is_refused():
    with pytest.raises(ValueError, match="nothing to fine-tune"):
        FinetuneConfig(standard=False)
