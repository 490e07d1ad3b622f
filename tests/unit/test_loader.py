"""Loader: deterministic order, disjoint ranks, exact resume, masking statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import MaskingConfig
from pipeline.data.loader import PretrainLoader, ShardSet
from pipeline.data.masking import IGNORE, mask_tokens, masked_positions, positions_per_row, special_mask
from pipeline.data.tokenizer import continuation_flags
from tests.conftest import run_cli, write_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bbc_sample) -> Path:
    root = tmp_path_factory.mktemp("loader")
    cfg = {"run": {"name": "l", "root": str(root / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample)], "doc_split": "file"}],
                    "tokenizer": {"kind": "bert-base-uncased"}, "seq_lengths": [64],
                    "validation_fraction": 0.05, "unit_mb": 0.2, "workers": 1}}
    proc = run_cli("prepare", "--config", str(write_config(root / "c.yaml", cfg)))
    assert proc.returncode == 0, proc.stderr
    return root / "runs" / "l" / "prepare"


def _loader(prepared: Path, **kw) -> PretrainLoader:
    args = {"micro_batch": 8, "masking": MaskingConfig(), "seed": 3, **kw}
    return PretrainLoader(ShardSet(prepared, 64, "train"), **args)


def _rows(batch: dict) -> list[tuple]:
    ids = torch.where(batch["labels"] != IGNORE, batch["labels"], batch["input_ids"])
    return [tuple(r.tolist()) for r in ids]


def test_same_seed_same_batches_and_epochs_differ(prepared):
    a, b = _loader(prepared), _loader(prepared)
    for _ in range(5):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
    first = [a.make_batch(0, i)["input_ids"] for i in range(3)]
    second = [a.make_batch(1, i)["input_ids"] for i in range(3)]
    assert not all(torch.equal(f, s) for f, s in zip(first, second))
    a.close(), b.close()


def test_ranks_read_disjoint_rows_covering_the_epoch(prepared):
    shards = ShardSet(prepared, 64, "train")
    orders = [PretrainLoader(shards, 8, MaskingConfig(), seed=3, rank=r, world_size=3).rank_order(0) for r in range(3)]
    assert all(len(o) == len(shards) // 3 for o in orders)
    seen = np.concatenate(orders)
    assert len(np.unique(seen)) == len(seen)


def test_state_dict_resumes_at_exactly_the_next_batch(prepared):
    straight = _loader(prepared)
    expected = [next(straight) for _ in range(straight.batches_per_epoch + 7)]  # crosses an epoch
    interrupted = _loader(prepared)
    for _ in range(straight.batches_per_epoch - 2):
        next(interrupted)
    state = interrupted.state_dict()
    interrupted.close()
    resumed = _loader(prepared)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(9)]
    for got, want in zip(rest, expected[straight.batches_per_epoch - 2:]):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.state_dict()["epoch"] == 1
    straight.close(), resumed.close()


def test_an_epoch_visits_every_row_once(prepared):
    loader = _loader(prepared)
    rows = [r for _ in range(loader.batches_per_epoch) for r in _rows(next(loader))]
    shards = ShardSet(prepared, 64, "train")
    everything = {tuple(r) for r in shards.take(np.arange(len(shards)))[0].tolist()}
    assert len(rows) == loader.batches_per_epoch * 8 and set(rows) <= everything
    assert len(set(rows)) == len(rows) or len(everything) < len(shards)  # duplicates only if the corpus has them
    loader.close()


def test_masking_statistics(prepared):
    shards = ShardSet(prepared, 64, "train")
    ids = torch.from_numpy(shards.take(np.arange(min(len(shards), 2000)))[0])
    masked, labels = mask_tokens(ids, MaskingConfig(), shards.info, torch.Generator().manual_seed(0))
    special = special_mask(ids, shards.info)
    chosen = labels != IGNORE
    assert not (chosen & special).any()
    rate = chosen.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.005
    to_mask = (masked == shards.info.mask_id) & chosen
    kept = (masked == ids) & chosen
    n = chosen.sum().item()
    assert abs(to_mask.sum().item() / n - 0.8) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01  # random replacements equal to the original are rare
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_whole_word_masking_masks_all_pieces_of_a_word(prepared):
    shards = ShardSet(prepared, 64, "train")
    cont = torch.tensor(continuation_flags(prepared / "tokenizer"))
    ids = torch.from_numpy(shards.take(np.arange(min(len(shards), 1000)))[0])
    _, labels = mask_tokens(ids, MaskingConfig(whole_word=True), shards.info, torch.Generator().manual_seed(1), cont)
    chosen = labels != IGNORE
    special = special_mask(ids, shards.info)
    pieces = cont[ids] & ~special
    pieces[:, 1:] &= ~special[:, :-1]  # a piece right after [CLS] starts its own (cut) word
    # a continuation piece is chosen exactly when the piece before it is
    assert torch.equal(chosen[:, 1:][pieces[:, 1:]], chosen[:, :-1][pieces[:, 1:]])
    assert pieces.any() and abs(chosen.float().sum().item() / (~special).sum().item() - 0.15) < 0.02


@pytest.mark.parametrize("before, after", [((1, 8), (2, 4)), ((2, 4), (1, 8)), ((2, 8), (1, 4))])
def test_resuming_on_another_layout_deals_out_the_rest_of_the_epoch(prepared, before, after):
    """1 -> 2 ranks, 2 -> 1, and a new micro-batch: the rows after the switch are exactly the rows the
    epoch had left (none skipped, none repeated), and the next epoch is the usual one for the new layout."""
    (w0, m0), (w1, m1) = before, after
    old = [_loader(prepared, micro_batch=m0, rank=r, world_size=w0) for r in range(w0)]
    seen = set()
    for _ in range(3):
        for loader in old:
            seen.update(next(loader)["rows"].tolist())
    state = old[0].state_dict()
    new = [_loader(prepared, micro_batch=m1, rank=r, world_size=w1) for r in range(w1)]
    for loader in new:
        loader.load_state_dict(state)
    rest, epoch = [], new[0].epoch
    while new[0].epoch == epoch:
        for loader in new:
            rest += next(loader)["rows"].tolist()
    n = len(new[0].shards)
    assert not seen & set(rest) and len(rest) == len(set(rest))
    assert len(seen) + len(rest) > n - w1 * m1 - w0 * m0  # only an epoch's tail that fills no batch is dropped
    fresh = _loader(prepared, micro_batch=m1, rank=0, world_size=w1)
    fresh.epoch = new[0].epoch
    assert torch.equal(next(new[0])["rows"], next(fresh)["rows"])  # the next epoch: the new layout's usual one
    for loader in old + new + [fresh]:
        loader.close()


def test_fixed_count_masking_statistics_and_static_positions(prepared):
    """Exactly round(15% of each row's maskable tokens), 80/10/10, and positions of one shape per length."""
    shards = ShardSet(prepared, 64, "train")
    ids = torch.from_numpy(shards.take(np.arange(min(len(shards), 2000)))[0])
    cfg = MaskingConfig(fixed_count=True)
    masked, labels = mask_tokens(ids, cfg, shards.info, torch.Generator().manual_seed(0))
    special = special_mask(ids, shards.info)
    chosen = labels != IGNORE
    assert not (chosen & special).any()
    assert torch.equal(chosen.sum(1), ((~special).sum(1) * 0.15).round().long())  # per row, not on average
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.15) < 0.005
    n = chosen.sum().item()
    assert abs(((masked == shards.info.mask_id) & chosen).sum().item() / n - 0.8) < 0.01
    assert abs(((masked == ids) & chosen).sum().item() / n - 0.1) < 0.01
    assert torch.equal(masked[~chosen], ids[~chosen])
    positions = masked_positions(labels, positions_per_row(64, 0.15))
    assert positions.shape == (len(ids), 10)  # ceil(0.15 x 62)
    covered = torch.zeros_like(chosen).scatter_(1, positions, True)
    assert not (chosen & ~covered).any()  # every label is among the row's positions
    assert (positions.diff(dim=1) > 0).all()  # sorted, no position twice

    loader = _loader(prepared, masking=cfg)
    for index in range(loader.batches_per_epoch):  # the unit's last row is padded: one batch has a mask
        batch = loader.make_batch(0, index)
        assert batch["mlm_positions"].shape == (batch["input_ids"].shape[0], 10)
        padded = (torch.from_numpy(shards.take(batch["rows"].numpy())[0]) == shards.info.pad_id).any()
        assert ("attention_mask" in batch) == bool(padded)


def test_fixed_count_and_whole_word_are_refused_together():
    with pytest.raises(ValueError, match="fixed_count"):
        MaskingConfig(fixed_count=True, whole_word=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_are_page_locked_on_a_gpu_machine_so_their_copy_does_not_wait_for_the_step(prepared):
    loader = _loader(prepared)
    assert loader.pin_memory
    batch = next(loader)
    assert all(v.is_pinned() for k, v in batch.items() if k != "rows")
    loader.close()

