"""Task data: GLUE-style tables and SQuAD files, read, checked and tokenised into batches.

A GLUE-style split is a TSV, CSV or JSONL table; the config names its text, optional text-pair
and label columns. Classification labels are kept as strings and mapped to ids by one label
list (given, or the sorted labels of train), so a dev label never seen in train is an error, not
a silent new class. SQuAD splits are the official JSON; their windows come from `squad.py`.
Every problem is one `ConfigError` line naming the task, the field and the file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import FinetuneTaskConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.rundir import atomic_write_json, atomic_write_text
from pipeline.tasks import squad

SPLITS = ("train", "dev", "test")


@dataclass
class Split:
    """One encoded split: token ids per row (unpadded) and labels, or SQuAD windows."""

    name: str
    ids: list[list[int]] | None = None
    type_ids: list[list[int]] | None = None
    labels: torch.Tensor | None = None  # None: a test split without labels
    features: squad.SquadFeatures | None = None
    examples: list[squad.SquadExample] | None = None
    note: str = ""  # what reading it repaired or left out

    def __len__(self) -> int:
        return len(self.features) if self.features is not None else len(self.ids)

    def lengths(self) -> list[int]:
        if self.features is not None:  # windows all have max_seq_len tokens
            return [self.features.input_ids.shape[1]] * len(self.features)
        return [len(ids) for ids in self.ids]

    def batch(self, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The rows at `indices`, padded to the longest of them (not to max_seq_len: short texts stay cheap)."""
        if self.features is not None:
            f, index = self.features, torch.tensor(indices, dtype=torch.long)
            batch = {"input_ids": f.input_ids[index], "attention_mask": f.attention_mask[index],
                     "token_type_ids": f.token_type_ids[index]}
            if self.name == "train":
                batch.update(start_positions=f.start_positions[index], end_positions=f.end_positions[index])
            return batch
        width = max(len(self.ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        type_ids = torch.zeros((len(indices), width), dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.ids[i])
            input_ids[row, :n] = torch.tensor(self.ids[i])
            type_ids[row, :n] = torch.tensor(self.type_ids[i])
            mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": type_ids}
        if self.labels is not None:
            batch["labels"] = self.labels[torch.tensor(indices, dtype=torch.long)]
        return batch


@dataclass
class TaskData:
    task: FinetuneTaskConfig
    labels: list[str]  # classification label names, in id order; [] otherwise
    splits: dict[str, Split]

    @property
    def num_labels(self) -> int:
        """Outputs of the head: one per class, one score (regression), or start and end (SQuAD)."""
        return {"classification": len(self.labels), "regression": 1, "squad": 2}[self.task.kind]


def _where(task: FinetuneTaskConfig, field: str) -> str:
    return f"finetune.tasks[{task.name}].{field}"


def read_table(task: FinetuneTaskConfig, split: str) -> pd.DataFrame:
    path = Path(getattr(task, split))
    fmt = task.format if task.format != "auto" else _format_of(path, task, split)
    if not path.is_file():
        raise ConfigError(f"{_where(task, split)}: {path} does not exist")
    try:
        if fmt == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        elif fmt == "parquet":  # GLUE and most tasks on the HF hub
            frame = pd.read_parquet(path)
        else:  # GLUE's TSVs contain unbalanced quotes: read them unquoted, as their own scripts do
            frame = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False,
                                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{_where(task, split)}: {path} is not a readable {fmt} table: {first}") from None
    if frame.empty:
        raise ConfigError(f"{_where(task, split)}: {path} has no rows")
    return frame


def _format_of(path: Path, task: FinetuneTaskConfig, split: str) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".zst", ".xz")]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    if ext in ("tsv", "csv", "jsonl", "parquet"):
        return ext
    if ext == "json":
        return "jsonl"
    raise ConfigError(f"{_where(task, split)}: cannot tell the format of {path} from its name; set "
                      f"{_where(task, 'format')} to tsv, csv, jsonl or parquet")


def _column(frame: pd.DataFrame, name: str, task: FinetuneTaskConfig, field: str, split: str) -> list:
    if name not in frame.columns:
        raise ConfigError(f"{_where(task, field)}: column '{name}' is not in {getattr(task, split)} "
                          f"(columns: {', '.join(map(str, frame.columns))})")
    return frame[name].tolist()


def label_list(task: FinetuneTaskConfig, train_labels: list) -> list[str]:
    seen = sorted({str(v) for v in train_labels})
    if task.labels is None:
        if len(seen) < 2:
            raise ConfigError(f"{_where(task, 'label_column')}: {task.train} has {len(seen)} distinct label(s); "
                              "classification needs at least 2")
        return seen
    unknown = [v for v in seen if v not in task.labels]
    if unknown:
        raise ConfigError(f"{_where(task, 'labels')}: {task.train} has labels {unknown} that are not among "
                          f"{task.labels}")
    return list(task.labels)


def _label_tensor(task: FinetuneTaskConfig, values: list, labels: list[str], split: str) -> torch.Tensor:
    if task.kind == "regression":
        try:
            return torch.tensor([float(v) for v in values], dtype=torch.float32)
        except ValueError as exc:
            raise ConfigError(f"{_where(task, 'label_column')}: {getattr(task, split)}: {exc}") from None
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(v) for v in values} - index.keys())
    if unknown:
        raise ConfigError(f"{_where(task, 'label_column')}: {getattr(task, split)} has labels {unknown[:5]} "
                          f"that are not among {labels}")
    return torch.tensor([index[str(v)] for v in values], dtype=torch.long)


def _encode_table(task: FinetuneTaskConfig, split: str, tokenizer) -> tuple[Split, list]:
    frame = read_table(task, split)
    texts = [str(t) for t in _column(frame, task.text_column, task, "text_column", split)]
    pairs = None
    if task.text_pair_column:
        pairs = [str(t) for t in _column(frame, task.text_pair_column, task, "text_pair_column", split)]
    encoded = tokenizer(texts, pairs, truncation=True, max_length=task.max_seq_len, return_token_type_ids=True)
    has_labels = split != "test" or task.label_column in frame.columns
    raw = _column(frame, task.label_column, task, "label_column", split) if has_labels else None
    return Split(split, ids=encoded["input_ids"], type_ids=encoded["token_type_ids"]), raw


def _load_squad(task: FinetuneTaskConfig, split: str, tokenizer) -> Split:
    path = Path(getattr(task, split))
    if not path.is_file():
        raise ConfigError(f"{_where(task, split)}: {path} does not exist")
    examples = squad.read_squad(path)
    if not task.version_2 and any(e.is_impossible for e in examples):
        raise ConfigError(f"{_where(task, 'version_2')}: {path} has unanswerable questions (SQuAD v2.0); "
                          "set version_2: true")
    relocated = sum(e.relocated for e in examples)
    unlocated = [e for e in examples if e.unlocated]
    note = f"{relocated} answer(s) found near, not at, their answer_start" if relocated else ""
    if unlocated:
        use = "skipped for training" if split == "train" else "still scored against its answers"
        note += f"{'; ' if note else ''}{len(unlocated)} question(s) whose answer text is not in the context, {use}"
    if split == "train":  # a window labelled "no answer" for an answerable question would teach the wrong thing
        examples = [e for e in examples if not e.unlocated]
        if not examples:
            raise PipelineError(f"{path}: no question's answer text is in its context")
    features = squad.make_features(examples, tokenizer, task.max_seq_len, task.doc_stride, task.max_query_len)
    return Split(split, features=features, examples=examples, note=f"{split}: {note}" if note else "")


def load_task(task: FinetuneTaskConfig, tokenizer) -> TaskData:
    """Read, check and tokenise every split of one task."""
    splits = [s for s in SPLITS if getattr(task, s) is not None]
    if task.kind == "squad":
        try:
            return TaskData(task, [], {s: _load_squad(task, s, tokenizer) for s in splits})
        except PipelineError as exc:
            raise ConfigError(f"finetune.tasks[{task.name}]: {exc}") from None
    encoded = {s: _encode_table(task, s, tokenizer) for s in splits}
    labels = label_list(task, encoded["train"][1]) if task.kind == "classification" else []
    for name, (split, raw) in encoded.items():
        if raw is not None:
            split.labels = _label_tensor(task, raw, labels, name)
    return TaskData(task, labels, {name: split for name, (split, _) in encoded.items()})


def write_predictions(data: TaskData, split: str, predictions, path: Path) -> None:
    """Predictions beside the run: TSV (row, prediction[, gold]) or SQuAD's {id: answer} JSON."""
    if data.task.kind == "squad":
        atomic_write_json(path.with_suffix(".json"), dict(predictions))
        return
    gold = data.splits[split].labels
    lines = ["index\tprediction" + ("\tlabel" if gold is not None else "")]
    for i, value in enumerate(predictions):
        shown = data.labels[int(value)] if data.task.kind == "classification" else f"{float(value):.6g}"
        if gold is not None:
            truth = data.labels[int(gold[i])] if data.task.kind == "classification" else f"{float(gold[i]):.6g}"
            shown += f"\t{truth}"
        lines.append(f"{i}\t{shown}")
    atomic_write_text(path.with_suffix(".tsv"), "\n".join(lines) + "\n")


def describe(data: TaskData) -> str:
    sizes = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
    extra = f", labels {json.dumps(data.labels)}" if data.labels else ""
    notes = "".join(f" ({split.note})" for split in data.splits.values() if split.note)
    return f"{data.task.name} ({data.task.kind}): {sizes}{extra}{notes}"
