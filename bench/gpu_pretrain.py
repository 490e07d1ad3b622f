"""P3 (GPU): BERT-base on one GPU: tokens/s and model FLOPs utilisation of the pretrain stage, before and
after the static step, at seq 128 and 512; and P4, the pruned/dense step time, in the same run.

usage: python bench/gpu_pretrain.py RUN_ROOT RUN_NAME [--only SUBSTRING] [--steps 60] [--out DIR]
       (RUN_NAME/prepare must exist, with seq 128 and 512 shards; `--preset tiny --precision fp32
       --peak 0.15 --steps 4 --micro-scale 0.05` runs the same harness on a CPU)

Seq 128 and 512 variants run the real pretrain stage (DeepSpeed, ZeRO-1 unless named, LAMB, sparse MLM
head) in a process each:
  eager            15% masking per token, the sparse head's `nonzero`, nothing compiled (as shipped before)
  static+compiled  fixed-count masking (static shapes, no host sync) and forward + loss as one compiled graph
  +CUDA graphs     the same compiled with mode "reduce-overhead" (pretrain.compile_mode)
MFU = model FLOPs per token (matmuls, fwd+bwd) x tokens/s / the peak given (default 989 TFLOP/s: H100 SXM
dense bf16, also the H200's). "loss Δ" is the final logged loss minus the eager run's at the same
sequence length and micro-batch; "noise" is that eager run's spread (std) over its last logged intervals.
Then bench/step_profile.py's in-process measurement, static step: dense vs EarlyBERT-pruned BERT-base
(P4: 4 of 12 heads, 40% of FFN; and with FFN widths multiples of 64), and at seq 512 which SDPA kernel
ran (flash or memory-efficient is asserted on a GPU; packed rows carry no mask).
Writes gpu_pretrain.md and adds this run's variants to gpu_pretrain.json under --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EAGER, STATIC = {"compile": False, "fixed_count": False}, {"compile": True, "fixed_count": True}
VARIANTS = {  # name: (seq, micro, settings)
    "seq 128, eager, micro 256": (128, 256, EAGER),
    "seq 128, static+compiled, micro 128": (128, 128, STATIC),
    "seq 128, static+compiled, micro 256": (128, 256, STATIC),
    "seq 128, static+compiled, micro 512": (128, 512, STATIC),
    "seq 128, static+compiled+CUDA graphs, micro 256": (128, 256, {**STATIC, "compile_mode": "reduce-overhead"}),
    "seq 128, static+compiled, micro 512, ZeRO-2": (128, 512, {**STATIC, "ds_config": "pretrain_zero2_lamb.json"}),
    "seq 512, eager, micro 64": (512, 64, EAGER),
    "seq 512, static+compiled, micro 64": (512, 64, STATIC),
    "seq 512, static+compiled, micro 128": (512, 128, STATIC),
}


def variant_config(args: argparse.Namespace, run: str, seq: int, micro: int, settings: dict) -> dict:
    prepared = yaml.safe_load((args.root / args.base / "prepare" / "config.yaml").read_text())
    data = dict(prepared["data"])
    data["masking"] = {**data.get("masking", {}), "fixed_count": settings["fixed_count"]}
    return {"run": {"name": run, "root": str(args.root), "seed": prepared["run"]["seed"]}, "data": data,
            "model": {"preset": args.preset, "dropout": 0.1}, "optimizer": {"name": "lamb", "lr": 6e-3},
            "pretrain": {"phases": [{"seq_len": seq, "steps": args.steps, "global_batch_size": micro,
                                     "micro_batch_size": micro}],
                         "precision": args.precision, "checkpoint_every": 10**6, "eval_every": 10**6,
                         "log_every": max(args.steps // 6, 1), "peak_tflops": args.peak,
                         "compile": settings["compile"], "compile_mode": settings.get("compile_mode", "default")},
            "distributed": {"ds_config": str(REPO / "ds_configs" / settings.get("ds_config",
                                                                               "pretrain_zero1_lamb.json"))}}


def run_variant(args: argparse.Namespace, name: str, seq: int, micro: int, settings: dict) -> dict:
    micro = max(int(micro * args.micro_scale), 1)
    run = f"{args.base}-" + "".join(c if c.isalnum() else "-" for c in name)
    src, dst = args.root / args.base / "prepare", args.root / run / "prepare"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src.resolve(), dst)
    path = args.root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(variant_config(args, run, seq, micro, settings)))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "pretrain", "--config", str(path), "--force"],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    rows = [json.loads(line) for line in (args.root / run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "tokens_per_s" in r][1:]  # the first interval holds compilation
    losses = [r["loss"] for r in rows if "tokens_per_s" in r]
    return {"seq": seq, "micro": micro, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady), "final_loss": losses[-1],
            "loss_spread": statistics.pstdev(losses[-3:]) if len(losses) >= 3 else None}


def step_rows(args: argparse.Namespace) -> dict:
    """P4 and the attention kernel, through bench/step_profile.py's in-process step."""
    sys.path.insert(0, str(REPO / "bench"))
    import step_profile

    prepare = str(args.root / args.base / "prepare")
    common = ["--preset", args.preset, "--precision", args.precision, "--steps", "8",
              "--out", str(args.out / "profiles")]
    micro = str(max(int(256 * args.micro_scale), 1))
    p4 = step_profile.main([prepare, *common, "--seq", "128", "--micro", micro, "--variants", "static,pruned,pruned64"])
    long_dropout = "0.1" if args.precision != "fp32" else "0.0"  # CPU's flash kernel has no dropout
    seq512 = step_profile.main([prepare, *common, "--seq", "512", "--micro", str(max(int(64 * args.micro_scale), 1)),
                                "--variants", "static", "--dropout", long_dropout])
    return {"pruned_ratio": p4["pruned"]["wall_ms"] / p4["static"]["wall_ms"],
            "pruned64_ratio": p4["pruned64"]["wall_ms"] / p4["static"]["wall_ms"], "p4": p4,
            "attention_seq512": seq512["static"]["attention"]}


def table(args: argparse.Namespace, results: dict, steps: dict, device: str) -> str:
    lines = [f"{args.preset} geometry, LAMB, sparse MLM head, {args.precision}, one {device}; ZeRO-1 unless named; "
             f"median over logged intervals after the first, {args.steps} steps; MFU against {args.peak:g} TFLOP/s.",
             "",
             "| variant | tokens/s | MFU | loss at end | loss Δ vs eager (noise) |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed | | | |")
            continue
        base = next((b for n, b in results.items() if "eager" in n and "error" not in b
                     and (b["seq"], b["micro"]) == (r["seq"], r["micro"])), None)
        delta = "—"
        if base is not None and base is not r:
            delta = f"{r['final_loss'] - base['final_loss']:+.3f}"
            if base["loss_spread"] is not None:
                delta += f" ({base['loss_spread']:.3f})"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['final_loss']:.3f} | {delta} |")
    if steps:
        lines += ["", f"P4, static step at seq 128 (bench/step_profile.py): pruned/dense step time "
                      f"**{steps['pruned_ratio']:.2f}** (goal ≤ 0.65), {steps['pruned64_ratio']:.2f} with FFN widths "
                      f"multiples of 64. Attention kernel at seq 512: "
                      f"{steps['attention_seq512']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("base")
    parser.add_argument("--only", default="", help="run the variants whose name contains this")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--peak", type=float, default=989.0, help="dense TFLOP/s of one device, for MFU")
    parser.add_argument("--micro-scale", type=float, default=1.0, help="multiply every micro-batch (small devices)")
    parser.add_argument("--no-step-profile", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    results = {name: run_variant(args, name, *spec) for name, spec in VARIANTS.items() if args.only in name}
    steps = {} if args.no_step_profile else step_rows(args)
    import torch

    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    if on_gpu and steps and steps["attention_seq512"] not in ("flash", "efficient", "cudnn"):
        raise SystemExit(f"seq 512 attention ran {steps['attention_seq512']}: not a fused SDPA kernel")
    text = table(args, results, steps, device)
    args.out.mkdir(parents=True, exist_ok=True)
    # flat, one key per variant (clusters/*.yaml read `mfu_from` variants by name); variants measured by an
    # earlier run and not rerun now are kept, each record saying its device
    path = args.out / "gpu_pretrain.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    for value in record.values():
        if isinstance(value, dict) and "mfu" in value:
            value.setdefault("device", record.get("device"))
    for name, r in results.items():
        record[name] = {**r, "device": device, "peak_tflops": args.peak}
    record.update({"device": device, "step_profile": steps})
    path.write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "gpu_pretrain.md").write_text(text + "\n")
    print(text)
    for name, r in results.items():
        if "error" in r:
            print(f"--- {name} failed:\n{r['error']}")


if __name__ == "__main__":
    main()
