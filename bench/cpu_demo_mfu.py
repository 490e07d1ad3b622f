"""P8: the demo pretraining's model FLOP/s as a fraction of this machine's fp32 matmul rate.

The demo's pretrain stage, as `make demo` runs it (configs/demo.yaml: 2-layer mini, 4k vocab, seq
128, global batch 32, LAMB, ZeRO-1, fp32), through launch/run_stage.sh for STEPS steps, side by side:
  2 ranks x 1 thread   the demo as shipped (hostfiles/localhost: the deepspeed launcher, gloo)
  1 rank x 2 threads   the same step in one process, the machine's two cores on each matmul
and each of those with the static step (data.masking.fixed_count; in one process also compiled:
pretrain.compile, forward and loss as one graph).
Model FLOP/s is the trainer's own accounting (tokens/s x FLOPs per token, the sparse MLM head
counted at the masked positions only): the median of the logged intervals after the first. The
denominator is a square 2048 fp32 matmul on all this machine's threads, best of before and after the
runs, measured in this run. Writes bench/results/cpu_demo_mfu.{json,md}.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
STEPS = 80
STATIC = {"data": {"masking": {"fixed_count": True}}}
COMPILED = {**STATIC, "pretrain": {"compile": True}}
VARIANTS = [("2 ranks x 1 thread (the demo as shipped)", "hostfiles/localhost", {}),
            ("2 ranks x 1 thread, fixed-count masking", "hostfiles/localhost", STATIC),
            ("1 rank x 2 threads", "", {}),
            ("1 rank x 2 threads, fixed-count masking", "", STATIC),
            ("1 rank x 2 threads, fixed-count masking, compiled", "", COMPILED)]


def stage(command: str, config: Path, hostfile: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", "launch/run_stage.sh", command, str(config), hostfile], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{command} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def model_flops_per_s(metrics: Path, peak_tflops: float, ranks: int) -> tuple[float, float]:
    """Median tokens/s and model FLOP/s over the logged intervals after the first (start-up, first eval)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r and r["phase"] == 0][1:]
    tokens = statistics.median(r["tokens_per_s"] for r in rows)
    flops = statistics.median(r["mfu"] * peak_tflops * 1e12 * ranks for r in rows)  # mfu = FLOP/s / (peak x ranks)
    return tokens, flops


def _last_loss(metrics: Path) -> float:
    return [json.loads(line) for line in metrics.read_text().splitlines()][-1]["loss"]


def main() -> int:
    from pipeline.plan.measure import matmul_tflops

    torch.set_num_threads(os.cpu_count() or 1)
    before = matmul_tflops()
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, hostfile, extra) in enumerate(VARIANTS):
            cfg = {"base": str(REPO / "configs/demo.yaml"), "run": {"name": f"p8-{index}", "root": tmp},
                   "data": extra.get("data", {}),
                   "pretrain": {"phases": [{**demo["pretrain"]["phases"][0], "steps": STEPS}], "eval_every": 1000,
                                "checkpoint_every": 1000, **extra.get("pretrain", {})}}
            config = Path(tmp) / f"p8-{index}.yaml"
            config.write_text(yaml.safe_dump(cfg))
            stage("prepare", config, "")
            stage("pretrain", config, hostfile)
            ranks = 2 if hostfile else 1
            peak = demo["pretrain"]["peak_tflops"]
            tokens, flops = model_flops_per_s(Path(tmp) / f"p8-{index}/pretrain/metrics.jsonl", peak, ranks)
            results.append({"variant": name, "ranks": ranks, "tokens_per_s": tokens, "model_tflops": flops / 1e12,
                            "loss_at_end": _last_loss(Path(tmp) / f"p8-{index}/pretrain/metrics.jsonl")})
    rate = max(before, matmul_tflops())
    for row in results:
        row["fraction_of_matmul"] = row["model_tflops"] / rate
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"steps": STEPS, "matmul_tflops": rate, "threads": os.cpu_count(), "rows": results}
    (OUT / "cpu_demo_mfu.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"The demo's pretrain step (configs/demo.yaml phase 0: 2-layer mini, 4k vocab, seq 128, global batch 32, "
             f"LAMB, ZeRO-1, fp32), {STEPS} steps through launch/run_stage.sh; model FLOP/s is the median logged "
             f"interval after the first; the fp32 matmul rate (2048^3, {os.cpu_count()} threads) is "
             f"{rate * 1e3:.0f} GFLOP/s, measured in the same run.", "",
             "| layout | tokens/s | model GFLOP/s | ÷ matmul rate | loss at the end |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['model_tflops'] * 1e3:.0f} | "
              f"{r['fraction_of_matmul']:.2f} | {r['loss_at_end']:.3f} |" for r in results]
    (OUT / "cpu_demo_mfu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
