"""The report's figures: training curves, throughput, communication, cost per stage, fine-tuning.

Each function draws one PNG from values `collect` read and returns its path, or None when the run
holds nothing to draw (the page then says so instead of linking an empty plot).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from pipeline.report.search_plots import pyplot, save

SHOWN = {"pretrain": "dense (pretrain)", "search": "search (gates + L1)", "retrain": "ticket (retrain)"}
COLORS = {"pretrain": "tab:blue", "search": "tab:purple", "retrain": "tab:green"}


def _series(records: list[dict], key: str, x: str = "seen") -> tuple[list[float], list[float]]:
    points = [(r[x], r[key]) for r in records if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _millions(values: list[float]) -> list[float]:
    return [v / 1e6 for v in values]


def plot_quality(curves: dict[str, list[dict]], baseline: dict | None, path: Path) -> Path | None:
    """MLM loss and accuracy, training (lines) and validation (markers), against tokens seen."""
    if not any(_series(r, "mlm_loss")[0] for r in curves.values()):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, train_key, eval_key, base_key, ylabel in (
            (axes[0], "mlm_loss", "eval_loss", "cross_entropy", "MLM loss (nats per masked token)"),
            (axes[1], "mlm_acc", "eval_acc", "accuracy", "MLM accuracy (masked tokens)")):
        for stage, records in curves.items():
            x, y = _series(records, train_key)
            ax.plot(_millions(x), y, color=COLORS.get(stage), linewidth=1.2, label=f"{SHOWN.get(stage, stage)} train")
            x, y = _series(records, eval_key)
            if x:
                ax.plot(_millions(x), y, color=COLORS.get(stage), linestyle="--", marker="o", markersize=4,
                        label=f"{SHOWN.get(stage, stage)} validation")
            x, y = _series(records, "eval_loss_at_mask") if eval_key == "eval_loss" else ([], [])
            if x:  # where the input is [MASK]: nothing to copy, only context to predict from
                ax.plot(_millions(x), y, color=COLORS.get(stage), linestyle=":", marker="x", markersize=4,
                        label=f"{SHOWN.get(stage, stage)} validation, at [MASK] inputs")
        if baseline:
            ax.axhline(baseline[base_key], color="black", linestyle=":", linewidth=1.2,
                       label=f"unigram baseline ({baseline[base_key]:.3f})")
        ax.set_xlabel("tokens seen (millions)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("masked-LM loss")
    axes[1].set_title("masked-LM accuracy")
    return save(fig, path)


def plot_lr(curves: dict[str, list[dict]], path: Path) -> Path | None:
    if not any(_series(r, "lr")[0] for r in curves.values()):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for stage, records in curves.items():
        x, y = _series(records, "lr")
        ax.plot(_millions(x), y, color=COLORS.get(stage), label=SHOWN.get(stage, stage))
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule (each phase warms up and decays)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_throughput(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """Tokens/s and MFU against minutes since the stage's first logged step."""
    if not any(_series(r, "tokens_per_s", "time")[0] for r in curves.values()):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for stage, records in curves.items():
        x, tps = _series(records, "tokens_per_s", "time")
        _, mfu = _series(records, "mfu", "time")
        if not x:
            continue
        minutes = [(t - x[0]) / 60 for t in x]
        axes[0].plot(minutes, tps, color=COLORS.get(stage), marker=".", label=SHOWN.get(stage, stage))
        axes[1].plot(minutes[:len(mfu)], [100 * m for m in mfu], color=COLORS.get(stage), marker=".",
                     label=SHOWN.get(stage, stage))
    axes[0].set_ylabel("training tokens/s (all ranks)")
    axes[1].set_ylabel("model FLOPs utilisation (% of peak_tflops)")
    for ax in axes:
        ax.set_xlabel("minutes since the stage's first logged step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("throughput")
    axes[1].set_title("MFU")
    return save(fig, path)


def plot_comm(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """Bytes each rank sent per step (gradient all-reduce or 1-bit exchange); log scale shows the freeze."""
    if not any(any(v > 0 for v in _series(r, "comm_bytes_per_step", "step")[1]) for r in curves.values()):
        return None  # one rank: nothing is sent
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for stage, records in curves.items():
        x, y = _series(records, "comm_bytes_per_step", "seen")
        points = [(a, b) for a, b in zip(x, y) if b > 0]
        if points:
            ax.plot(_millions([p[0] for p in points]), [p[1] / 2**20 for p in points], color=COLORS.get(stage),
                    marker=".", label=SHOWN.get(stage, stage))
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("MiB sent per step per rank")
    ax.set_title("communication per step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save(fig, path)


def _stacked(ax, timed: dict, value, ylabel: str, title: str) -> None:
    """Dense (pretrain) beside the ticket (search + prune + retrain), each bar stacked by stage."""
    for path_name, parts in (("dense", ("pretrain",)), ("ticket", ("search", "prune", "retrain"))):
        bottom = 0.0
        for part in (p for p in parts if p in timed):
            ax.bar(path_name, value(timed[part]), bottom=bottom, color=COLORS.get(part, "tab:orange"), label=part)
            bottom += value(timed[part])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot_costs(stages: dict, path: Path) -> Path | None:
    """Wall time of every stage and training FLOPs of the training stages; dense vs ticket pretraining cost."""
    timed = {name: s for name, s in stages.items() if s.seconds is not None}
    if not timed:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    names = list(timed)
    axes[0, 0].bar(names, [timed[n].seconds / 60 for n in names], color=[COLORS.get(n, "tab:gray") for n in names])
    axes[0, 0].set_ylabel("wall time (minutes)")
    axes[0, 0].set_title("time per stage")
    trained = [n for n in names if timed[n].flops > 0]
    axes[0, 1].bar(trained, [timed[n].flops / 1e12 for n in trained],
                   color=[COLORS.get(n, "tab:gray") for n in trained])
    axes[0, 1].set_ylabel("training TFLOPs")
    axes[0, 1].set_title("training FLOPs per stage")
    if "pretrain" in timed or "retrain" in timed:
        _stacked(axes[1, 0], timed, lambda s: s.seconds / 60, "pretraining wall time (minutes)",
                 "dense vs ticket: pretraining time")
        _stacked(axes[1, 1], timed, lambda s: s.flops / 1e12, "pretraining TFLOPs", "dense vs ticket: FLOPs")
    else:
        axes[1, 0].set_visible(False)
        axes[1, 1].set_visible(False)
    for ax in axes.flat:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    return save(fig, path)


def plot_dev_curves(results: list[dict], path: Path) -> Path | None:
    """Per task: the dev metric after every epoch, one line per (model, variant)."""
    from pipeline.tasks.metrics import primary_metric

    tasks = list(dict.fromkeys(r["task"] for r in results if r.get("history")))
    if not tasks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = None
        for r in (r for r in results if r["task"] == task):
            metric = primary_metric(r["kind"])
            values = [epoch.get(metric) for epoch in r["history"]]
            label = r["model"] + ("" if r["variant"] == "standard" else f" ({r['variant']})")
            ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"dev {metric}")
        ax.set_title(task)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def plot_confusion(task: str, matrices: list[tuple[str, list[str], list[list[int]]]], path: Path) -> Path | None:
    """Dev confusion matrices of one classification task, one panel per model."""
    if not matrices:
        return None
    plt = pyplot()
    size = max(3.2, 0.55 * len(matrices[0][1]) + 1.8)
    fig, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices), size), squeeze=False)
    for ax, (label, names, counts) in zip(axes[0], matrices):
        grid = np.array(counts)
        ax.imshow(grid, cmap="Blues")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > grid.max() / 2 else "black")
        ticks = range(len(names))
        ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(ticks, names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{task}: dev confusion matrix")
    return save(fig, path)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
