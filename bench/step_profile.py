"""Where one pretrain step's time goes, before and after the static step: host vs device, and which
attention kernel runs.

usage: python bench/step_profile.py PREPARE_DIR [--preset base] [--micro 256] [--seq 128]
           [--precision bf16] [--steps 12] [--dropout 0.1] [--out bench/results]

Builds the pretrain stage's own pieces (stock HF BERT, sparse MLM head, this project's LAMB, the
DeepSpeed engine with ds_configs/pretrain_zero1_lamb.json, one rank) on prepared shards, for:
  eager     as shipped before: 15% masking drawn per token, the sparse head's `nonzero`
  static    fixed-count masking (static gather), forward + loss compiled as one graph
  pruned    static, on the EarlyBERT-pruned geometry (4 of 12 heads in every layer, 40% of FFN neurons)
  pruned64  the same, each layer's FFN width rounded to a multiple of 64 (search.ffn_multiple)
Per variant: wall time per step (synchronised), the host's time to issue a step (perf_counter around
the step without a sync: on a GPU, a host-bound step has issue time close to wall time), the device's
busy time per step (sum of GPU kernel time in a torch profile; CPU: none), and the attention operator
torch dispatched (`flash` / `efficient` / `math`). Writes step_profile.{json,md} under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from pipeline.config import MaskingConfig, ModelConfig, OptimizerConfig, ScheduleConfig, SearchConfig
from pipeline.data.loader import PretrainLoader, ShardSet
from pipeline.dist import Dist, detect
from pipeline.earlybird import random_masks
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.model.bert import PretrainObjective, bert_config, build_model, compile_whole
from pipeline.model.prune import prune_model
from pipeline.optim.build import build_optimizer
from pipeline.optim.schedule import warmup_poly

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("eager", "static", "pruned", "pruned64")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(args: argparse.Namespace, variant: str, shards: ShardSet) -> tuple[Engine, PretrainLoader]:
    torch.manual_seed(0)
    config = bert_config(ModelConfig(preset=args.preset, dropout=args.dropout), shards.info.vocab_size,
                         shards.info.pad_id)
    hf = build_model(config, pairs=False)
    if variant.startswith("pruned"):
        rules = SearchConfig(ffn_multiple=64 if variant == "pruned64" else 1)  # EarlyBERT's ratios and scopes
        masks = random_masks(rules, (config.num_hidden_layers, config.num_attention_heads),
                             (config.num_hidden_layers, config.intermediate_size), seed=0)
        prune_model(hf, masks.to_plan())
    objective = PretrainObjective(hf)
    if variant != "eager":
        compile_whole(objective)
    optimizer = build_optimizer(OptimizerConfig(), objective, 1e-4)
    plan = BatchPlan(args.micro, 1, 1, args.precision, 1.0)
    engine = Engine(objective, optimizer, warmup_poly(optimizer, 100, ScheduleConfig()),
                    ds_config(REPO / "ds_configs/pretrain_zero1_lamb.json", plan), Dist(detect(os.environ)))
    loader = PretrainLoader(shards, args.micro, MaskingConfig(fixed_count=variant != "eager"), seed=1)
    return engine, loader


def step(engine: Engine, loader: PretrainLoader) -> torch.Tensor:
    batch = next(loader)
    batch.pop("rows")
    out = engine(**batch)  # the engine moves the batch to the device
    engine.backward(out.loss)
    engine.step()
    return out.loss.detach()


def attention_kernel(names: set[str]) -> str:
    """The SDPA implementation a profile shows: its aten operator names say which one ran."""
    found = sorted({kind for name in names if "scaled_dot_product" in name
                    for kind in ("flash", "efficient", "cudnn", "math") if kind in name})
    return "+".join(found) or "unfused (no SDPA kernel in the profile)"


def measure(args: argparse.Namespace, variant: str, shards: ShardSet) -> dict:
    engine, loader = build(args, variant, shards)
    for _ in range(3):  # warm-up: compilation, DeepSpeed's first-step allocations
        step(engine, loader)
    sync()
    issue, start = 0.0, time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step(engine, loader)
        issue += time.perf_counter() - t0
    sync()
    wall = (time.perf_counter() - start) / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step(engine, loader)
        sync()
    events = prof.key_averages()
    device = sum(e.self_device_time_total for e in events) / 3 / 1e6 if torch.cuda.is_available() else None
    loader.close()
    return {"tokens_per_s": args.micro * args.seq / wall, "wall_ms": wall * 1e3, "issue_ms": issue / args.steps * 1e3,
            "device_busy_ms": None if device is None else device * 1e3,
            "attention": attention_kernel({e.key for e in events}), "loss": float(loss),
            "parameters": sum(p.numel() for p in engine.module.parameters())}


def table(args: argparse.Namespace, results: dict, device: str) -> str:
    lines = [f"{args.preset} geometry, seq {args.seq}, micro-batch {args.micro}, {args.precision}, "
             f"dropout {args.dropout}, "
             f"LAMB, ZeRO-1, one rank on {device}; {args.steps} timed steps after 3 warm-up.", "",
             "| variant | tokens/s | step ms | host issue ms | device busy ms | attention | step ÷ eager |",
             "|---|---:|---:|---:|---:|---|---:|"]
    base = results.get("eager", {}).get("wall_ms")
    for name, r in results.items():
        busy = "—" if r["device_busy_ms"] is None else f"{r['device_busy_ms']:.1f}"
        ratio = f"{r['wall_ms'] / base:.2f}" if base else "—"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['wall_ms']:.1f} | {r['issue_ms']:.1f} | {busy} "
                     f"| {r['attention']} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepare_dir", type=Path)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--micro", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    shards = ShardSet(args.prepare_dir, args.seq, "train")
    results = {v: measure(args, v, shards) for v in args.variants.split(",")}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    text = table(args, results, device)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"step_profile_{args.preset}_seq{args.seq}"
    (args.out / f"{name}.json").write_text(json.dumps({"device": device, **vars(args), "prepare_dir": str(
        args.prepare_dir), "out": str(args.out), "results": results}, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
