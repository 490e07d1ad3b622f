"""Everything the report shows, read from the run directory (no stage is imported, nothing is rerun)."""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.report.provenance import read_commands, read_jsonl
from pipeline.stages import ORDER

TRAINING = ("pretrain", "search", "retrain")  # stages that write metrics.jsonl


@dataclass
class StageInfo:
    name: str
    record: dict
    seconds: float | None
    flops: float

    @property
    def status(self) -> str:
        return self.record.get("status", "?")


@dataclass
class RunData:
    path: Path
    stages: dict[str, StageInfo] = field(default_factory=dict)
    curves: dict[str, list[dict]] = field(default_factory=dict)  # training stage -> metrics.jsonl records
    commands: list[dict] = field(default_factory=list)
    config_text: str = ""
    search: dict | None = None  # history.json + masks.json + snapshots (when present)
    finetune: dict | None = None  # results.json, plus comparison.md


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stage(path: Path, name: str) -> StageInfo | None:
    record = _read_json(path / name / "stage.json")
    if record is None:
        return None
    seconds = None
    if record.get("ended_at"):
        seconds = (dt.datetime.fromisoformat(record["ended_at"])
                   - dt.datetime.fromisoformat(record["started_at"])).total_seconds()
    metrics = record.get("metrics", {})
    flops = sum(v for k, v in metrics.items() if k.endswith("_flops") and isinstance(v, (int, float)))
    return StageInfo(name, record, seconds, float(flops))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl with tokens seen; a torn line is skipped, not fatal to the report."""
    return with_cumulative_tokens(read_jsonl(path))


def with_cumulative_tokens(records: list[dict]) -> list[dict]:
    """Add `seen`: tokens trained since the stage began, across phases (each phase counts from 0).

    Evaluation-only lines carry no token count; within a phase every step trains the same number
    of tokens, so theirs follows from the step.
    """
    per_step: dict[int, float] = {}
    for r in records:
        if r.get("tokens") and r.get("step"):
            per_step.setdefault(r["phase"], r["tokens"] / r["step"])
    offset, phase_end, out = 0.0, {}, []
    for r in sorted(records, key=lambda r: (r["phase"], r["step"])):
        phase = r["phase"]
        if phase not in phase_end:
            offset = sum(phase_end.values())
            phase_end[phase] = 0.0
        tokens = r.get("tokens") or per_step.get(phase, 0.0) * r["step"]
        phase_end[phase] = max(phase_end[phase], tokens)
        out.append({**r, "seen": offset + tokens})
    return out


def _search(path: Path) -> dict | None:
    history, masks = _read_json(path / "history.json"), _read_json(path / "masks.json")
    if history is None or masks is None:
        return None
    out = {"history": history, "masks": masks, "snapshots": None}
    if (path / "snapshots.pt").exists():
        import torch

        out["snapshots"] = torch.load(path / "snapshots.pt", weights_only=True)
    return out


def confusion(predictions: Path) -> tuple[list[str], list[list[int]]] | None:
    """(labels, counts[gold][predicted]) from a classification predictions TSV with gold labels."""
    if not predictions.exists():
        return None
    with open(predictions, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "label" not in rows[0]:
        return None
    labels = sorted({r["label"] for r in rows} | {r["prediction"] for r in rows})
    index = {name: i for i, name in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for r in rows:
        counts[index[r["label"]]][index[r["prediction"]]] += 1
    return labels, counts


def collect(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    data = RunData(run_dir, commands=read_commands(run_dir))
    if (run_dir / "config.yaml").exists():
        data.config_text = (run_dir / "config.yaml").read_text()
    for name in ORDER:
        info = _stage(run_dir, name)
        if info is not None:
            data.stages[name] = info
    for name in TRAINING:
        records = read_metrics(run_dir / name / "metrics.jsonl")
        if records:
            data.curves[name] = records
    if "search" in data.stages:
        data.search = _search(run_dir / "search")
    results = _read_json(run_dir / "finetune" / "results.json")
    if results is not None:
        data.finetune = results
    return data
