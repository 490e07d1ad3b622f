"""The comparison report: dense vs EarlyBERT ticket, downstream quality against training cost.

Pretraining cost is read from the run directory's stage records: the dense model costs the
pretrain stage; the ticket costs search + prune + retrain (EarlyBERT's total). Fine-tuning
cost is this stage's own, per task. FLOPs are the training FLOPs the stages counted (pretrain:
the model's per-token formula; fine-tuning: 6 x encoder weights x trained tokens).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from rich.table import Table

from pipeline.tasks.metrics import primary_metric

SHOWN_AS = {"pretrain": "pretrain (dense)", "retrain": "retrain (EarlyBERT ticket)",
            "prune": "prune (ticket, not retrained)", "scratch": "scratch (random init, control)"}
PRETRAIN_STAGES = {"pretrain": ("pretrain",), "retrain": ("search", "prune", "retrain"),
                   "prune": ("search", "prune")}


def _stage_cost(stage_dir: Path) -> tuple[float, float] | None:
    """(seconds, training FLOPs) of one complete stage, from its stage.json."""
    path = stage_dir / "stage.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("status") != "complete" or not record.get("ended_at"):
        return None
    seconds = (dt.datetime.fromisoformat(record["ended_at"]) - dt.datetime.fromisoformat(record["started_at"]))
    metrics = record.get("metrics", {})
    flops = sum(v for k, v in metrics.items() if k.endswith("_flops") and isinstance(v, (int, float)))
    return seconds.total_seconds(), float(flops)


def pretraining_cost(run_dir: Path, model: str) -> dict | None:
    if model == "scratch":
        return {"stages": "none", "seconds": 0.0, "flops": 0.0}
    stages = PRETRAIN_STAGES.get(model)
    if stages is None:
        return None  # an outside checkpoint: its cost is not ours to know
    costs = [_stage_cost(Path(run_dir) / stage) for stage in stages]
    if any(c is None for c in costs):
        return None
    return {"stages": "+".join(stages), "seconds": sum(c[0] for c in costs), "flops": sum(c[1] for c in costs)}


def comparison_rows(results: list[dict], run_dir: Path) -> list[dict]:
    """One row per (model, variant): its parameters, pretraining cost, and per task metric + fine-tuning time."""
    rows: dict[tuple[str, str], dict] = {}
    for r in results:
        row = rows.setdefault((r["model"], r["variant"]), {
            "model": r["model"], "variant": r["variant"], "parameters": r["parameters"],
            "pretraining": pretraining_cost(run_dir, r["model"]), "tasks": {}})
        metric = primary_metric(r["kind"])
        row["tasks"][r["task"]] = {"metric": metric, "value": r["metrics"].get(metric),
                                   "seconds": r["seconds"], "flops": r["flops"]}
    dense = rows.get(("pretrain", "standard"))
    for row in rows.values():
        base, own = (dense or {}).get("pretraining"), row["pretraining"]
        if row["model"] == "scratch":  # no pretraining is not a saving
            base = None
        row["pretraining_saving"] = (1 - own["seconds"] / base["seconds"]) if base and own and base["seconds"] else None
        row["pretraining_flops_saving"] = (1 - own["flops"] / base["flops"]) if base and own and base["flops"] else None
    return list(rows.values())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.0f}%"


def render(rows: list[dict], tasks: list[str], run_name: str) -> tuple[Table, str]:
    """The rich table for the console and the same as Markdown for the run directory / README."""
    header = ["model", "fine-tuning", "params", "pretrain time", "pretrain TFLOPs", "time saved", "FLOPs saved"]
    for task in tasks:
        metric = next((r["tasks"][task]["metric"] for r in rows if task in r["tasks"]), "")
        header += [f"{task} {metric}", f"{task} fine-tune"]
    lines = []
    for row in rows:
        pre = row["pretraining"]
        cells = [SHOWN_AS.get(row["model"], row["model"]), row["variant"], f"{row['parameters'] / 1e6:.2f}M",
                 f"{pre['seconds']:.0f} s" if pre else "-", f"{pre['flops'] / 1e12:.2f}" if pre else "-",
                 _pct(row["pretraining_saving"]), _pct(row["pretraining_flops_saving"])]
        for task in tasks:
            t = row["tasks"].get(task)
            value = "-" if not t or t["value"] is None else f"{t['value']:.4f}"
            cells += [value, f"{t['seconds']:.0f} s" if t else "-"]
        lines.append(cells)
    table = Table(title=f"run {run_name}: dense vs EarlyBERT ticket (pretraining cost from the stage records)")
    for name in header:
        table.add_column(name, justify="left" if name in ("model", "fine-tuning") else "right")
    for cells in lines:
        table.add_row(*cells)
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(cells) + " |" for cells in lines]
    return table, "\n".join(markdown) + "\n"
