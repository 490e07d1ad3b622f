"""`python -m pipeline report`: the run's page, `<run>/report/report.md`, and its figures.

Built into a temporary directory and renamed into place, so an old report stays whole until a
new one is complete. Sections appear for the stages the run holds; the unigram baseline is
computed from the prepare stage's shards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from pipeline.report import figures
from pipeline.report.baseline import unigram_baseline
from pipeline.report.collect import RunData, collect, confusion
from pipeline.report.sections import finetune_section, search_section, training_table
from pipeline.rundir import fsync_dir

REPORT = "report"


def build_report(run_dir: Path, search_cfg=None) -> Path:
    """Write `<run_dir>/report/report.md` (+ PNGs); return its path. `search_cfg` redraws masks per check."""
    run_dir = Path(run_dir)
    data = collect(run_dir)
    final = run_dir / REPORT
    tmp = run_dir / f".{REPORT}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    baseline = unigram_baseline(run_dir / "prepare") if "prepare" in data.stages else None
    lines = _header(data)
    lines += _stages(data, tmp)
    lines += _training(data, baseline, tmp)
    if data.search is not None:
        lines += search_section(data, search_cfg, tmp)
    if data.finetune is not None:
        lines += _finetune(data, tmp)
    if data.config_text:
        lines += ["## Configuration", "", "<details><summary>config.yaml as resolved</summary>", "", "```yaml",
                  data.config_text.rstrip(), "```", "", "</details>", ""]
    (tmp / "report.md").write_text("\n".join(lines) + "\n")
    old = run_dir / f".{REPORT}.old.{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final / "report.md"


def _image(path: Path | None, alt: str) -> list[str]:
    return [f"![{alt}]({path.name})", ""] if path is not None else [f"*{alt}: nothing recorded*", ""]


def _header(data: RunData) -> list[str]:
    digest = hashlib.sha256(data.config_text.encode()).hexdigest()[:12] if data.config_text else "-"
    lines = [f"# Run `{data.path.name}`", "", "| | |", "|---|---|", f"| run directory | `{data.path}` |",
             f"| config hash (sha256 of config.yaml) | `{digest}` |"]
    if data.commands:
        last = data.commands[-1]
        versions = ", ".join(f"{k} {v}" for k, v in last["versions"].items())
        hw = last["hardware"]
        machine = f"{hw.get('cpu')} ({hw.get('cores')} cores, {hw.get('memory_gib')} GiB)"
        if hw.get("gpu"):
            machine += f", {hw.get('gpus_per_node')} x {hw['gpu']}"
        lines += [f"| versions | {versions} |", f"| hardware (rank 0's host `{hw.get('host')}`) | {machine} |",
                  f"| ranks | {last['world_size']} ({last['launcher']} launch) |"]
    lines += ["", "Commands run in this directory:", "", "```"]
    lines += [f"{c['at']}  {c['command']}   # {c['world_size']} rank(s)" for c in data.commands] or ["(none recorded)"]
    return lines + ["```", ""]


def _stages(data: RunData, out: Path) -> list[str]:
    lines = ["## Stages", "", "| stage | status | wall time | training TFLOPs | ranks | host | stage config hash |",
             "|---|---|---:|---:|---:|---|---|"]
    for name, s in data.stages.items():
        seconds = f"{s.seconds:,.0f} s" if s.seconds is not None else "-"
        flops = f"{s.flops / 1e12:,.2f}" if s.flops else "-"
        lines.append(f"| {name} | {s.status} | {seconds} | {flops} | {s.record.get('world_size', '')} | "
                     f"{s.record.get('host', '')} | `{s.record.get('config_hash', '')[:12]}` |")
    lines.append("")
    return lines + _image(figures.plot_costs(data.stages, out / "costs.png"), "time and FLOPs per stage")


def _training(data: RunData, baseline: dict | None, out: Path) -> list[str]:
    if not data.curves:
        return []
    lines = ["## Pretraining", ""]
    if baseline:
        lines += [f"Unigram baseline (every masked token predicted from the training split's token frequencies, "
                  f"scored on all {baseline['tokens']:,} validation tokens): cross-entropy "
                  f"**{baseline['cross_entropy']:.3f} nats**, accuracy **{baseline['accuracy']:.3f}**. Of the masked "
                  f"tokens, 10% are left unchanged in the input and can be copied; the loss at [MASK] inputs "
                  f"counts only what the model predicts from context.", ""]
    lines += training_table(data, baseline) + [""]
    lines += _image(figures.plot_quality(data.curves, baseline, out / "mlm.png"), "MLM loss and accuracy")
    lines += _image(figures.plot_lr(data.curves, out / "lr.png"), "learning rate")
    lines += _image(figures.plot_throughput(data.curves, out / "throughput.png"), "tokens/s and MFU")
    comm = figures.plot_comm(data.curves, out / "comm.png")
    lines += _image(comm, "bytes sent per step") if comm else ["*one rank: no gradient communication*", ""]
    return lines


def _finetune(data: RunData, out: Path) -> list[str]:
    results = data.finetune["results"]
    lines = finetune_section(data)
    lines += _image(figures.plot_dev_curves(results, out / "finetune_dev.png"), "dev metric per epoch")
    for task in dict.fromkeys(r["task"] for r in results if r["kind"] == "classification"):
        matrices = []
        for r in (r for r in results if r["task"] == task):
            found = confusion(data.path / "finetune" / r["dir"] / "predictions" / "dev.tsv")
            if found:
                matrices.append((r["model"] + ("" if r["variant"] == "standard" else f" ({r['variant']})"), *found))
        lines += _image(figures.plot_confusion(task, matrices, out / f"confusion_{task}.png"),
                        f"{task} confusion matrix")
    return lines
