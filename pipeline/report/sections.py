"""The report's tables and text for training, search and fine-tuning (figures come from `figures`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.report import figures
from pipeline.report.collect import RunData
from pipeline.report.search_plots import plot_distances, plot_head_masks, plot_kept


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def _steps(records: list[dict]) -> int:
    """Optimizer steps over all phases (each phase counts its own from 1)."""
    last: dict[int, int] = {}
    for r in records:
        last[r["phase"]] = max(last.get(r["phase"], 0), r["step"])
    return sum(last.values())


def training_table(data: RunData, baseline: dict | None) -> list[str]:
    # "at [MASK]": the loss where the input is [MASK], so nothing can be copied: what context buys
    lines = ["| stage | tokens seen | steps | final train MLM loss | final validation MLM loss | below unigram "
             "| at [MASK] inputs | below unigram | validation accuracy | median tokens/s | median MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, records in data.curves.items():
        val, at_mask = _last(records, "eval_loss"), _last(records, "eval_loss_at_mask")
        margin, mask_margin = ((baseline["cross_entropy"] - v if baseline and v is not None else None)
                               for v in (val, at_mask))
        tps = figures.median([r.get("tokens_per_s") for r in records])
        mfu = figures.median([r.get("mfu") for r in records])
        lines.append(f"| {figures.SHOWN.get(stage, stage)} | {max(r['seen'] for r in records) / 1e6:.2f} M "
                     f"| {_steps(records):,} "
                     f"| {_fmt(_last(records, 'mlm_loss'))} | {_fmt(val)} | {_fmt(margin, '+.3f')} nats "
                     f"| {_fmt(at_mask)} | {_fmt(mask_margin, '+.3f')} nats "
                     f"| {_fmt(_last(records, 'eval_acc'))} | {_fmt(tps, ',.0f')} | {_fmt(mfu, '.3g')} |")
    return lines


def search_section(data: RunData, search_cfg, out: Path) -> list[str]:
    found = data.search
    history, masks = found["history"], found["masks"]
    lines = ["## Ticket search", ""]
    emerged = history.get("emerged_at")
    lines += [f"Mode `{history.get('mode')}`: trained {history.get('trained_steps')} of at most "
              f"{history.get('budget', '-')} steps; " + (f"the ticket emerged at step **{emerged}**."
                                                          if emerged is not None else "no early emergence."),
              f"The ticket keeps {masks['heads_kept']} of {masks['heads_total']} attention heads and "
              f"{masks['ffn_kept']:,} of {masks['ffn_total']:,} FFN neurons.", ""]
    snapshots = found.get("snapshots")
    if snapshots and search_cfg is not None and snapshots["steps"]:
        from pipeline.earlybird import ticket_masks

        heads = [ticket_masks(search_cfg, snap["heads"], snap["ffn"]).heads.numpy().astype(np.float32)
                 for snap in snapshots["snapshots"]]
        path = plot_head_masks(snapshots["steps"], heads, out / "search_head_masks.png")
        lines += [f"![kept heads per check]({path.name})", ""]
    if history.get("steps") and search_cfg is not None:
        path = plot_distances(history["steps"], history["head_distances"], history["ffn_distances"],
                              search_cfg.head_distance_threshold, search_cfg.ffn_distance_threshold, emerged,
                              out / "search_distance.png")
        lines += [f"![mask distance]({path.name})", ""]
    layers = len(masks["plan"]["heads"])
    path = plot_kept(masks["plan"], masks["heads_total"] // layers, masks["ffn_total"] // layers,
                     out / "search_kept.png")
    return lines + [f"![kept heads and neurons per layer]({path.name})", ""]


def finetune_section(data: RunData) -> list[str]:
    saved = data.finetune
    lines = ["## Fine-tuning", "", "Best dev epoch of each model, with pretraining cost from the stage records:", ""]
    comparison = data.path / "finetune" / "comparison.md"
    if comparison.exists():
        lines += [comparison.read_text().rstrip(), ""]
    lines += _against_scratch(saved["results"])
    return lines


def _against_scratch(results: list[dict]) -> list[str]:
    """Points each pretrained model gains over the same architecture fine-tuned from random weights."""
    from pipeline.tasks.metrics import primary_metric

    scratch = {r["task"]: r for r in results if r["model"] == "scratch" and r["variant"] == "standard"}
    if not scratch:
        return []
    lines = ["What pretraining bought (dev metric minus that of `scratch`, the same architecture from random "
             "weights, same seed and fine-tuning):", "", "| model | task | dev | scratch | gain (points) |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        base = scratch.get(r["task"])
        if r["model"] == "scratch" or base is None:
            continue
        metric = primary_metric(r["kind"])
        mine, theirs = r["metrics"].get(metric), base["metrics"].get(metric)
        if mine is None or theirs is None:
            continue
        name = r["model"] + ("" if r["variant"] == "standard" else f" ({r['variant']})")
        lines.append(f"| {name} | {r['task']} {metric} | {mine:.4f} | {theirs:.4f} | {100 * (mine - theirs):+.1f} |")
    return lines + [""]
