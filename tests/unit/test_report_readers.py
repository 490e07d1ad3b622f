"""The report's readers: tokens seen across phases, the unigram baseline, confusion counts."""

from __future__ import annotations

import json
import math

import numpy as np

from pipeline.report.baseline import unigram_baseline
from pipeline.report.collect import confusion, read_metrics, with_cumulative_tokens


def test_tokens_seen_add_up_across_phases_and_evaluation_lines_get_theirs_from_the_step():
    records = [{"phase": 0, "step": 10, "tokens": 1000}, {"phase": 0, "step": 20, "tokens": 2000},
               {"phase": 0, "step": 25, "eval_loss": 5.0},  # evaluation only: no token count of its own
               {"phase": 1, "step": 5, "tokens": 300}, {"phase": 1, "step": 10, "tokens": 600}]
    seen = [r["seen"] for r in with_cumulative_tokens(records)]
    assert seen == [1000, 2000, 2500, 2800, 3100]


def test_a_torn_metrics_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"phase": 0, "step": 1, "tokens": 8}) + "\n" + '{"phase": 0, "st')
    assert [r["step"] for r in read_metrics(path)] == [1]


def _prepare_dir(tmp, train: np.ndarray, valid: np.ndarray, vocab: int) -> None:
    entries = {}
    for split, rows in (("train", train), ("valid", valid)):
        rel = f"shards/L4/{split}/u0.bin"
        (tmp / rel).parent.mkdir(parents=True)
        rows.astype(np.uint16).tofile(tmp / rel)
        entries[split] = [{"path": rel, "rows": len(rows)}]
    tokenizer = {"vocab_size": vocab, "pad_id": 0, "cls_id": 1, "sep_id": 2, "mask_id": 3, "unk_id": 4,
                 "sha256": "-", "dtype": "uint16"}
    (tmp / "manifest.json").write_text(json.dumps({"shards": {"L4": entries}, "tokenizer": tokenizer}))


def test_unigram_baseline_is_the_validation_cross_entropy_under_smoothed_training_frequencies(tmp_path):
    # training: token 5 three times, token 6 once (specials are not counted); vocab 8 -> 5 countable ids
    train = np.array([[1, 5, 5, 2], [1, 5, 6, 2]])
    valid = np.array([[1, 5, 6, 0], [1, 7, 0, 0]])
    _prepare_dir(tmp_path, train, valid, vocab=8)
    found = unigram_baseline(tmp_path)
    p = {5: 4 / 9, 6: 2 / 9, 7: 1 / 9}  # add-one over 4 counted tokens + 5 countable ids
    expected = -(math.log(p[5]) + math.log(p[6]) + math.log(p[7])) / 3
    assert abs(found["cross_entropy"] - expected) < 1e-9
    assert abs(found["accuracy"] - 1 / 3) < 1e-9 and found["tokens"] == 3


def test_confusion_counts_gold_against_predicted(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tprediction\tlabel\n0\tpos\tpos\n1\tneg\tpos\n2\tneg\tneg\n")
    labels, counts = confusion(path)
    assert labels == ["neg", "pos"] and counts == [[1, 0], [1, 1]]
