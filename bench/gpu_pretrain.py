"""P3 (GPU): BERT-base, seq 128, one GPU: tokens/s and model FLOPs utilisation of the pretrain stage.

Runs the real pretrain stage (DeepSpeed, ZeRO-1, LAMB, sparse MLM head) on prepared data for a few
variants side by side: bf16 eager, bf16 with the encoder compiled, fp16 (dynamic loss scaling) compiled.
MFU = model FLOPs per token (matmuls, fwd+bwd) x tokens/s / peak dense TFLOPs of the device.
usage: python bench/gpu_pretrain.py RUN_ROOT RUN_NAME [OUT_DIR]   (RUN_NAME/prepare must exist)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"bf16, micro 256": {"precision": "bf16", "compile": False},
            "bf16+compile, micro 256": {"precision": "bf16", "compile": True},
            "fp16+compile, micro 256": {"precision": "fp16", "compile": True},
            "bf16+compile, micro 512": {"precision": "bf16", "compile": True, "micro": 512},
            "bf16+compile, micro 512, ZeRO-2": {"precision": "bf16", "compile": True, "micro": 512,
                                                "ds_config": "pretrain_zero2_lamb.json"}}
STEPS, MICRO, PEAK = 60, 256, 989.0  # H100 SXM dense bf16/fp16 peak


def run_variant(root: Path, base: str, name: str, settings: dict) -> dict:
    settings = dict(settings)
    micro = settings.pop("micro", MICRO)
    ds_json = settings.pop("ds_config", "pretrain_zero1_lamb.json")
    run = f"{base}-" + "".join(c if c.isalnum() else "-" for c in name)
    src, dst = root / base / "prepare", root / run / "prepare"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src.resolve(), dst)
    prepared = yaml.safe_load((src / "config.yaml").read_text())
    cfg = {"run": {"name": run, "root": str(root), "seed": prepared["run"]["seed"]}, "data": prepared["data"],
           "model": {"preset": "base", "dropout": 0.1}, "optimizer": {"name": "lamb", "lr": 6e-3},
           "pretrain": {"phases": [{"seq_len": 128, "steps": STEPS, "global_batch_size": micro,
                                    "micro_batch_size": micro}],
                        "checkpoint_every": 10**6, "eval_every": 10**6, "log_every": 10, "peak_tflops": PEAK,
                        **settings},
           "distributed": {"ds_config": str(REPO / "ds_configs" / ds_json)}}
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "pretrain", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    rows = [json.loads(line) for line in (root / run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "tokens_per_s" in r][1:]  # the first interval holds compilation
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady), "final_loss": rows[-1]["loss"]}


def main() -> None:
    root, base = Path(sys.argv[1]), sys.argv[2]
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else REPO / "bench" / "results"
    results = {name: run_variant(root, base, name, settings) for name, settings in VARIANTS.items()}
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    lines = [f"BERT-base (110M), seq 128, LAMB, ZeRO-1 unless named, sparse MLM head, {device}; "
             f"median over logged intervals after the first, {STEPS} steps.", "",
             "| variant | tokens/s | MFU | loss at end |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed | | |")
        else:
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['final_loss']:.3f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_pretrain.json").write_text(json.dumps({"device": device, **results}, indent=2) + "\n")
    (out / "gpu_pretrain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for name, r in results.items():
        if "error" in r:
            print(f"--- {name} failed:\n{r['error']}")


if __name__ == "__main__":
    main()
