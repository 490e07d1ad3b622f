"""EarlyBERT in fine-tuning on a real BERT: does the searched ticket keep dense accuracy for less time?

all-MiniLM-L6-v2 (bench/configs/earlybert_finetune.yaml) on Rotten Tomatoes and BBC News, every
variant through the finetune stage as a user runs it (`python -m pipeline finetune`), one run
directory per seed:

  dense      standard fine-tuning, every weight (3 epochs at 2e-5);
  searched   EarlyBERT: gates + L1 at 2e-5 until the FIFO rule fires (masks drawn 100 times an
             epoch), rewind, prune, fine-tune the ticket (2 epochs at 4e-5);
  random     the searched ticket's per-layer head and neuron counts, which ones drawn at random
             (the paper's baseline), fine-tuned like the ticket;
  fixed      the ticket drawn at 0.2 of the first epoch (the paper's draw), fine-tuned like it.

Then the curve: on Rotten Tomatoes, searched and random tickets at other pruning ratios (fewer
and more heads and neurons kept), same seeds. Time is each variant's fine-tuning wall time, its
search included; FLOPs the stage's count (6 x encoder weights x trained tokens, search included).

    python bench/earlybert_finetune.py [--seeds 1 2 3] [--root DIR] [--out DIR] [--no-curve]

Finished variants are kept in --root (their result.json), so an interrupted run continues.
Writes bench/results/earlybert_finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from pipeline.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from earlybert_fidelity import pipeline, seconds, spread, subsample_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_ROWS = {"rotten_tomatoes": 4000}  # BBC: all 1,721 train articles
VARIANTS = {"standard": "dense", "earlybert": "searched", "earlybert-random": "random", "earlybert-fixed": "fixed"}
CURVE = [(1 / 6, 0.2), (1 / 3, 0.4), (1 / 2, 0.6)]  # (heads pruned per layer, FFN neurons pruned overall)
CURVE_TASK = "rotten_tomatoes"
# the paper's fine-tuning table, BERT-base on GLUE, as a reference (not measured here)
PAPER = ("EarlyBERT paper, BERT-base on GLUE (reference)", "ticket within ~0.2-1.5 points of dense; random tickets "
         "several points behind on QNLI/MNLI; 40-45% less fine-tuning time")


def bench_configs(root: Path, cap: int | None) -> tuple[Path, Path]:
    """The main config (train sets subsampled) and the curve's (its task only, tickets only)."""
    cfg = load_config(REPO / "bench/configs/earlybert_finetune.yaml")
    raw = cfg.model_dump(mode="json")
    raw["finetune"]["tasks"] = subsample_tasks(cfg, root, cap, TRAIN_ROWS)
    main = root / "config.yaml"
    main.write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["finetune"]["tasks"] = [t for t in raw["finetune"]["tasks"] if t["name"] == CURVE_TASK]
    raw["finetune"]["standard"] = False
    raw["finetune"]["earlybert"]["tickets"] = ["searched", "random"]
    curve = root / "curve.yaml"
    curve.write_text(yaml.safe_dump(raw, sort_keys=False))
    return main, curve


def results_of(root: Path, name: str) -> list[dict]:
    return json.loads((root / name / "finetune" / "results.json").read_text())["results"]


def run_all(args, root: Path, report) -> dict:
    """The seeds' main runs, reported as soon as they exist, then the curve's."""
    main, curve = bench_configs(root, args.train_rows)
    runs = {"main": {}, "curve": {}}
    stage_seconds = 0.0
    for seed in args.seeds:
        name = f"seed{seed}"
        stage_seconds += seconds(pipeline("finetune", main, name, root, [f"run.seed={seed}"]))
        runs["main"][seed] = results_of(root, name)
    report({"runs": runs, "stage_seconds": stage_seconds})
    for heads, ffn in ([] if args.no_curve else [c for c in CURVE if c != (1 / 3, 0.4)]):
        for seed in args.seeds:
            name = f"curve-h{heads:.3f}-f{ffn:.2f}-seed{seed}"
            sets = [f"run.seed={seed}", f"finetune.earlybert.search.head_prune_ratio={heads}",
                    f"finetune.earlybert.search.ffn_prune_ratio={ffn}"]
            stage_seconds += seconds(pipeline("finetune", curve, name, root, sets))
            runs["curve"].setdefault(f"{heads:.3f}/{ffn:.2f}", {})[seed] = results_of(root, name)
    return {"runs": runs, "stage_seconds": stage_seconds}


def summarise(runs: dict) -> dict:
    """Per task and variant over seeds: accuracy, seconds and FLOPs against dense, emergence, parameters."""
    table: dict = {}
    for results in runs["main"].values():
        dense = {r["task"]: r for r in results if r["variant"] == "standard"}
        for r in results:
            row = table.setdefault(r["task"], {}).setdefault(VARIANTS[r["variant"]], {
                "accuracy": [], "time_ratio": [], "flops_ratio": [], "seconds": [], "emerged": [], "drawn": [],
                "parameters": r["parameters"]})
            base = dense[r["task"]]
            row["accuracy"].append(r["metrics"]["accuracy"])
            row["seconds"].append(r["seconds"])
            row["time_ratio"].append(r["seconds"] / base["seconds"])
            row["flops_ratio"].append(r["flops"] / base["flops"])
            ticket = r.get("ticket") or {}
            row["emerged"].append(ticket.get("emerged_fraction"))
            row["drawn"].append(ticket.get("drawn_fraction"))
    curve: dict = {}
    main_point = [("0.333/0.40", r) for results in runs["main"].values() for r in results
                  if r["task"] == CURVE_TASK and r["variant"] in ("earlybert", "earlybert-random")]
    points = [(key, r) for key, by_seed in runs["curve"].items() for results in by_seed.values() for r in results]
    for key, r in points + main_point:
        point = curve.setdefault(key, {}).setdefault(VARIANTS[r["variant"]], {"accuracy": [], "kept": None})
        point["accuracy"].append(r["metrics"]["accuracy"])
        t = r["ticket"]
        point["kept"] = (t["heads_kept"] / t["heads_total"], t["ffn_kept"] / t["ffn_total"], r["parameters"])
    return {"table": table, "curve": curve}


def _acc(values: list[float]) -> str:
    d = spread(values)
    return f"{d['mean']:.3f} ± {d['std']:.3f} ({d['min']:.3f}-{d['max']:.3f})"


def _fractions(values: list) -> str:
    shown = [f"{v:.2f}" for v in values if v is not None]
    missing = sum(v is None for v in values)
    return ", ".join(shown + ["none"] * missing) if values else "-"


def _goals(rows: dict) -> list[str]:
    dense, ticket, rand = (spread(rows[v]["accuracy"]) for v in ("dense", "searched", "random"))
    gap, lead = dense["mean"] - ticket["mean"], ticket["mean"] - rand["mean"]
    seeds_std = max(ticket["std"], rand["std"])
    time_saved = 1 - statistics.mean(rows["searched"]["time_ratio"])
    emerged = [v for v in rows["searched"]["emerged"] if v is not None]
    return [f"ticket within 1 point of dense: {100 * gap:+.1f} points below dense "
            f"({'met' if gap <= 0.01 else 'missed'})",
            f"ahead of the random ticket by more than the seeds' std: {100 * lead:+.1f} points, std "
            f"{100 * seeds_std:.1f} ({'met' if lead > seeds_std else 'missed'})",
            f"fine-tuning time ≥ 35% less than dense (search included): {100 * time_saved:.0f}% less "
            f"({'met' if time_saved >= 0.35 else 'missed'})",
            f"emergence within the first epoch, ≤ 20% of it: {len(emerged)} of {len(rows['searched']['emerged'])} "
            f"seeds emerged, at {_fractions(rows['searched']['emerged'])} of epoch 1 "
            f"({'met' if len(emerged) == len(rows['searched']['emerged']) and max(emerged) <= 0.2 else 'missed'})"]


def render(summary: dict, meta: dict) -> str:
    lines = [f"all-MiniLM-L6-v2, fp32, 1 process on {meta['threads']} CPU threads, seeds {meta['seeds']}, train rows "
             f"{meta['train_rows']}, full dev sets; batch 32. Dense: 3 epochs at 2e-5. Tickets: 1/3 of the heads per "
             "layer and 40% of the FFN neurons (over all layers) pruned; search at 2e-5, L1 1e-4, masks drawn 100 "
             "times an epoch, FIFO of 5 within 0.1; the ticket fine-tuned 2 epochs at 4e-5. Time and FLOPs are "
             f"against dense, search included. Stage wall time of the benchmark: {meta['stage_seconds'] / 60:.0f} "
             "min.", ""]
    for task, rows in summary["table"].items():
        lines += [f"**{task}**", "", "| variant | encoder params | emerged (fraction of epoch 1) | drawn at | "
                  "fine-tuning time vs dense | FLOPs vs dense | dev accuracy mean ± std (min-max) |",
                  "|---|---:|---|---|---:|---:|---:|"]
        for variant in ("dense", "searched", "random", "fixed"):
            if variant not in rows:
                continue
            r = rows[variant]
            searched = variant in ("searched", "fixed")
            emerged, drawn = (_fractions(r[k]) if searched else "-" for k in ("emerged", "drawn"))
            lines.append(f"| {variant} | {r['parameters'] / 1e6:.2f}M | {emerged} | {drawn} | "
                         f"{statistics.mean(r['time_ratio']):.2f} "
                         f"({statistics.mean(r['seconds']):.0f} s) | {statistics.mean(r['flops_ratio']):.2f} | "
                         f"{_acc(r['accuracy'])} |")
        lines += [f"| {PAPER[0]} | | | 0.2 | | | {PAPER[1]} |", ""]
        if all(v in rows for v in ("dense", "searched", "random")):
            lines += [f"Goals on {task}:", ""] + [f"- {g}" for g in _goals(rows)] + [""]
    if summary["curve"]:
        lines += [f"**Kept fraction vs dev accuracy, {CURVE_TASK}** (searched vs random ticket, same seeds)", "",
                  "| heads kept | FFN neurons kept | encoder params | searched | random | searched - random |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for key in sorted(summary["curve"], key=lambda k: -float(k.split("/")[0])):
            point = summary["curve"][key]
            if "searched" not in point or "random" not in point:
                continue
            heads, ffn, params = point["searched"]["kept"]
            lead = statistics.mean(point["searched"]["accuracy"]) - statistics.mean(point["random"]["accuracy"])
            lines.append(f"| {heads:.0%} | {ffn:.0%} | {params / 1e6:.2f}M | {_acc(point['searched']['accuracy'])} | "
                         f"{_acc(point['random']['accuracy'])} | {100 * lead:+.1f} pts |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--root", type=Path, default=REPO / "runs/bench-earlybert-finetune")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    parser.add_argument("--no-curve", action="store_true", help="the main table only")
    parser.add_argument("--train-rows", type=int, help="train rows of every task (default: TRAIN_ROWS, all of BBC)")
    args = parser.parse_args()
    import torch

    start, root = time.time(), args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)

    def report(done: dict) -> None:
        summary = summarise(done["runs"])
        meta = {"seeds": args.seeds, "threads": torch.get_num_threads(), "stage_seconds": done["stage_seconds"],
                "train_rows": args.train_rows or {**TRAIN_ROWS, "bbc": "all"}, "wall_seconds": time.time() - start}
        table = render(summary, meta)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "earlybert_finetune.json").write_text(json.dumps({**meta, **summary, "runs": done["runs"]},
                                                                     indent=2, default=str) + "\n")
        (args.out / "earlybert_finetune.md").write_text(table)
        print(table, flush=True)

    report(run_all(args, root, report))


if __name__ == "__main__":
    main()
