"""EarlyBERT fidelity: does the early-bird ticket keep the dense model's quality for less pretraining?

Four pretrained models from one config (bench/configs/earlybert_fidelity.yaml), in one run, then each
fine-tuned on the demo tasks with several seeds:

  dense      pretrain: the full dense budget;
  earlybert  search (gates + L1 until the ticket emerges) -> prune -> retrain, the retrain continuing
             from the searched weights for the rest of `retrain.fraction` of the dense budget;
  random     a random ticket of the same size (search mode random: EarlyBERT's ablation), pruned at
             initialisation and trained for the same number of steps as the EarlyBERT ticket;
  scratch    no pretraining: the dense model's initial weights (the search's `rewind/`).

Pretraining time is each arm's stage wall time from its `stage.json` (search + prune + retrain for the
tickets), FLOPs the trainer's own count. Fine-tuning: every model on every task with each seed (the
train sets subsampled once, the same rows for everybody; full dev sets), dev accuracy mean ± sample
standard deviation and the range over seeds. Also reported: the step the ticket emerged at as a
fraction of the dense budget (P7) and the pruned/dense training step time (P4, this geometry).

    python bench/earlybert_fidelity.py [--config FILE] [--set a.b=c ...] [--seeds 1 2 3] [--root DIR]
        [--train-rows N] [--out DIR]

Stages that are already complete in --root are skipped, so an interrupted run continues. Writes
bench/results/earlybert_fidelity.{json,md} (with --out: there instead).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
ARMS = ("dense", "earlybert", "random", "scratch")
TRAIN_ROWS = {"rotten_tomatoes": 5000, "bbc": 1000}  # fine-tuning train rows kept per task (CPU budget)


def pipeline(stage: str, config: Path, name: str, root: Path, sets: list[str] = ()) -> dict:
    """One stage through `python -m pipeline`, as a user runs it; returns its stage record."""
    args = [sys.executable, "-m", "pipeline", stage, "--config", str(config), "--set", f"run.name={name}",
            "--set", f"run.root={root}"]
    for item in sets:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}
    print(f"-- {name}: {stage}", flush=True)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} {stage} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads((root / name / stage / "stage.json").read_text())


def seconds(record: dict) -> float:
    return (datetime.fromisoformat(record["ended_at"]) - datetime.fromisoformat(record["started_at"])).total_seconds()


def subsample_tasks(cfg, root: Path, cap: int | None, train_rows: dict[str, int] = TRAIN_ROWS) -> list[dict]:
    """The config's tasks with train sets cut to `train_rows` (or `cap`): a fixed, seeded choice of rows."""
    import random

    tasks = []
    for task in cfg.finetune.tasks:
        rows = list(csv.reader(task.train.open(encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))
        header, body = rows[0], rows[1:]
        count = min(cap or train_rows.get(task.name, len(body)), len(body))
        keep = sorted(random.Random(0).sample(range(len(body)), count))
        path = root / "tasks" / task.name / "train.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        writer.writerows([header] + [body[i] for i in keep])
        if not path.exists() or path.read_text(encoding="utf-8") != out.getvalue():  # a rewrite reruns finetune
            path.write_text(out.getvalue(), encoding="utf-8")
        tasks.append({**task.model_dump(mode="json"), "train": str(path), "test": None})
    return tasks


def bench_config(args, root: Path) -> tuple[Path, object]:
    """The benchmark's config: the given one, its fine-tuning models the four arms, tasks subsampled."""
    cfg = load_config(args.config, args.set)
    raw = cfg.model_dump(mode="json")
    raw["finetune"]["tasks"] = subsample_tasks(cfg, root, args.train_rows)
    raw["finetune"]["models"] = [str(root / "models" / arm) for arm in ARMS]
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, load_config(path)


def pretrain_arms(config: Path, root: Path) -> dict:
    """Dense, EarlyBERT ticket and random ticket, each through the pipeline's stages; their records."""
    rec = {"prepare": pipeline("prepare", config, "dense", root)}
    rec["dense"] = [pipeline("pretrain", config, "dense", root)]
    _share_prepare(root, "earlybert")
    rec["earlybert"] = [pipeline(s, config, "earlybert", root) for s in ("search", "prune", "retrain")]
    # the random ticket cannot continue a search it did not run: pruned at initialisation, it trains
    # as many steps as the EarlyBERT ticket did in all (search + retrain)
    steps = rec["earlybert"][0]["metrics"]["trained_steps"] + rec["earlybert"][2]["metrics"]["phase0_steps"]
    _share_prepare(root, "random")
    sets = ["search.mode=random", "retrain.rewind=search_start", "retrain.continue_search=false",
            f"retrain.steps=[{steps}]"]
    rec["random"] = [pipeline(s, config, "random", root, sets) for s in ("search", "prune", "retrain")]
    return rec


def _share_prepare(root: Path, name: str) -> None:
    """Every arm reads the dense run's prepared shards (the same data, prepared once)."""
    link = root / name / "prepare"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(root / "dense" / "prepare", target_is_directory=True)


def model_dirs(root: Path) -> None:
    """models/<arm>: what each arm hands to fine-tuning (scratch: the initial weights + the tokenizer)."""
    models = root / "models"
    models.mkdir(exist_ok=True)
    links = {"dense": root / "dense/pretrain/export", "earlybert": root / "earlybert/retrain/export",
             "random": root / "random/retrain/export"}
    for arm, target in links.items():
        if not (models / arm).exists():
            (models / arm).symlink_to(target, target_is_directory=True)
    scratch = models / "scratch"
    if not scratch.exists():
        tmp = models / "scratch.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root / "earlybert/search/rewind", tmp)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (links["dense"] / name).exists():
                shutil.copy(links["dense"] / name, tmp / name)
        os.replace(tmp, scratch)


def finetune_seeds(config: Path, root: Path, seeds: list[int]) -> dict:
    """results[arm][task] = [dev metric per seed]; one finetune run directory per seed."""
    results: dict = {arm: {} for arm in ARMS}
    seconds_: dict = {arm: [] for arm in ARMS}
    stages = 0.0
    for seed in seeds:
        stages += seconds(pipeline("finetune", config, f"finetune-seed{seed}", root, [f"run.seed={seed}"]))
        saved = json.loads((root / f"finetune-seed{seed}" / "finetune" / "results.json").read_text())
        for row in saved["comparison"]:
            for task, value in row["tasks"].items():
                results[row["model"]].setdefault(task, []).append(value["value"])
            seconds_[row["model"]].append(sum(v["seconds"] for v in row["tasks"].values()))
    return {"dev": results, "finetune_seconds": seconds_, "stage_seconds": stages}


def unigram_cross_entropy(prepare_dir: Path) -> float:
    """Validation tokens' cross-entropy (nats) under the training split's token frequencies (add-one): what
    a model that knows no context scores; a pretrained model's MLM loss has to get below it to mean anything."""
    import numpy as np

    manifest = json.loads((prepare_dir / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    length = str(manifest["seq_lengths"][0])

    def tokens(split: str):
        files = [prepare_dir / s["path"] for s in manifest["shards"][f"L{length}"][split]]
        ids = np.concatenate([np.fromfile(f, dtype=tok["dtype"]) for f in files])
        specials = [tok[k] for k in ("pad_id", "unk_id", "cls_id", "sep_id", "mask_id")]
        return ids[~np.isin(ids, specials)]

    counts = np.bincount(tokens("train"), minlength=tok["vocab_size"]).astype(float) + 1.0
    return float(-np.log(counts / counts.sum())[tokens("valid")].mean())


def median_tokens_per_s(stage_dir: Path) -> float:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))


def pretraining_cost(rec: dict) -> dict:
    """Per arm: stage seconds, FLOPs, steps and final validation MLM loss, as the stages recorded them."""
    dense = rec["dense"][0]["metrics"]
    cost = {"dense": {"seconds": seconds(rec["dense"][0]), "flops": dense["phase0_flops"],
                      "steps": dense["phase0_steps"], "val_loss": dense["phase0_final_eval_loss"]},
            "scratch": {"seconds": 0.0, "flops": 0.0, "steps": 0, "val_loss": dense["phase0_initial_eval_loss"]}}
    for arm in ("earlybert", "random"):
        search, _, retrain = rec[arm]
        m = retrain["metrics"]
        cost[arm] = {"seconds": sum(seconds(r) for r in rec[arm]),
                     "flops": search["metrics"].get("trained_flops", 0.0) + m["phase0_flops"],
                     "steps": search["metrics"]["trained_steps"] + m["phase0_steps"],
                     "val_loss": m["phase0_final_eval_loss"]}
    return cost


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def render(cfg, result: dict) -> str:
    cost, dev, tasks = result["pretraining"], result["dev"], [t.name for t in cfg.finetune.tasks]
    dense = cost["dense"]
    model = cfg.model
    lines = [f"{result['config']}: hidden {model.hidden_size}, {model.num_layers} layers, {model.num_heads} heads, "
             f"FFN {model.intermediate_size}, vocab {result['vocab_size']}, seq {cfg.pretrain.phases[0].seq_len}, "
             f"batch {cfg.pretrain.phases[0].global_batch_size}, dense budget {dense['steps']} steps, fp32, "
             f"1 process on {result['threads']} CPU threads. Tickets: {cfg.search.head_prune_ratio:.0%} of heads "
             f"per layer and {cfg.search.ffn_prune_ratio:.0%} of FFN neurons pruned, retrain to "
             f"{cfg.retrain.fraction:.0%} of the dense steps. Fine-tuning: seeds {result['seeds']}, train rows "
             f"{result['train_rows']}, full dev sets; dev accuracy mean ± std (min-max). "
             f"Stage wall time of the whole benchmark {result['stage_seconds'] / 60:.0f} min (prepare, the three "
             f"pretrainings, {len(result['seeds'])} x 4 x {len(tasks)} fine-tunings).", "",
             "| model | encoder params | pretraining steps | pretraining time | time vs dense | TFLOPs | "
             "FLOPs vs dense | final val MLM loss | " + " | ".join(tasks) + " |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for arm in ARMS:
        c = cost[arm]
        cells = [arm, f"{result['parameters'][arm] / 1e6:.2f}M", str(c["steps"]), f"{c['seconds']:.0f} s",
                 f"{c['seconds'] / dense['seconds']:.2f}", f"{c['flops'] / 1e12:.1f}",
                 f"{c['flops'] / dense['flops']:.2f}",
                 f"{c['val_loss']:.3f}"]
        cells += [f"{d['mean']:.3f} ± {d['std']:.3f} ({d['min']:.3f}-{d['max']:.3f})"
                  for d in (spread(dev[arm][t]) for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    p7, p4 = result["p7"], result["p4"]
    lines += ["", f"Validation MLM loss of a model that ignores context (the validation tokens' cross-entropy "
                  f"under the training split's token frequencies): {result['unigram_cross_entropy']:.3f} nats."]
    at = p7["emerged_at"]
    lines += ["", f"P7: the ticket emerged at step {at} of the dense budget's {dense['steps']} "
                  f"({at / dense['steps']:.0%}; goal ≤ 20%)" if at is not None else
              f"P7: no ticket emerged within the search cap of {cfg.search.max_steps} steps",
              f"P4 (this geometry): pruned/dense training step time {p4['ratio']:.2f} (median tokens/s "
              f"{p4['pruned_tokens_per_s']:,.0f} pruned vs {p4['dense_tokens_per_s']:,.0f} dense); FLOPs per token "
              f"ratio {p4['flops_ratio']:.2f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "bench/configs/earlybert_fidelity.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--root", type=Path, default=REPO / "runs/bench-fidelity")
    parser.add_argument("--train-rows", type=int, help="fine-tuning train rows per task (default: TRAIN_ROWS)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args()
    import torch

    start, root = time.time(), args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    config, cfg = bench_config(args, root)
    rec = pretrain_arms(config, root)
    model_dirs(root)
    tuned = finetune_seeds(config, root, args.seeds)
    saved = json.loads((root / f"finetune-seed{args.seeds[0]}" / "finetune" / "results.json").read_text())
    cost = pretraining_cost(rec)
    dense_tps = median_tokens_per_s(root / "dense" / "pretrain")
    pruned_tps = median_tokens_per_s(root / "earlybert" / "retrain")
    per_step = {arm: cost[arm]["flops"] / cost[arm]["steps"] for arm in ("dense", "random")}  # same batch
    search = rec["earlybert"][0]["metrics"]
    rows = {t.name: args.train_rows or TRAIN_ROWS.get(t.name) for t in cfg.finetune.tasks}
    result = {"config": str(args.config.resolve().relative_to(REPO)) if args.config.resolve().is_relative_to(REPO)
              else str(args.config), "overrides": args.set, "seeds": args.seeds, "train_rows": rows,
              "threads": torch.get_num_threads(), "vocab_size": cfg.data.tokenizer.vocab_size,
              "pretraining": cost, "unigram_cross_entropy": unigram_cross_entropy(root / "dense" / "prepare"),
              "dev": tuned["dev"], "finetune_seconds": tuned["finetune_seconds"],
              "parameters": {row["model"]: row["parameters"] for row in saved["comparison"]},
              "p7": {"emerged_at": search["emerged_at"], "budget": cost["dense"]["steps"]},
              "p4": {"dense_tokens_per_s": dense_tps, "pruned_tokens_per_s": pruned_tps,
                     "ratio": dense_tps / pruned_tps, "flops_ratio": per_step["random"] / per_step["dense"]},
              "wall_seconds": time.time() - start,
              "stage_seconds": seconds(rec["prepare"]) + sum(c["seconds"] for c in cost.values())
              + tuned["stage_seconds"]}
    table = render(cfg, result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "earlybert_fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "earlybert_fidelity.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
