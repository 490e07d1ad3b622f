"""GPU check of the 1-bit path: CUDA bit packing equals the CPU path, and 1-bit Adam/LAMB pretrain on NCCL.

usage: python bench/gpu_onebit_check.py RUN_ROOT RUN_NAME [OUT_DIR]   (RUN_NAME/prepare must exist)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline.optim.compress import CompressedAllreduce, pack_signs, unpack_signs

REPO = Path(__file__).resolve().parents[1]


def packing_matches() -> bool:
    x = torch.randn(8 * 100_003, generator=torch.Generator().manual_seed(0))
    cpu, gpu = pack_signs(x), pack_signs(x.cuda())
    return torch.equal(cpu, gpu.cpu()) and torch.equal(unpack_signs(gpu).cpu(), unpack_signs(cpu))


def compressor_on_cuda() -> float:
    comp = CompressedAllreduce(1_000_001, device="cuda")
    drift = torch.zeros(1_000_001, device="cuda")
    for _ in range(50):
        x = torch.randn(1_000_001, device="cuda") * 0.1 + 0.05
        drift += comp(x) - x
    return float(drift.norm() / comp.worker_error.norm())  # 1.0: the drift is exactly the carried error


def pretrain(root: Path, base: str, optimizer: str) -> dict:
    run = f"{base}-{optimizer}"
    dst = root / run / "prepare"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((root / base / "prepare").resolve(), dst)
    prepared = yaml.safe_load((root / base / "prepare" / "config.yaml").read_text())
    cfg = {"run": {"name": run, "root": str(root), "seed": prepared["run"]["seed"]}, "data": prepared["data"],
           "model": {"preset": "small"}, "optimizer": {"name": optimizer, "lr": 1e-3, "freeze_step": 20},
           "pretrain": {"phases": [{"seq_len": 128, "steps": 60, "global_batch_size": 64, "micro_batch_size": 64}],
                        "precision": "bf16", "checkpoint_every": 30, "eval_every": 30, "log_every": 10},
           "distributed": {"ds_config": str(REPO / "ds_configs/pretrain_onebit_adam.json"), "backend": "nccl"}}
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "pretrain", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-1500:]}
    record = json.loads((root / run / "pretrain" / "stage.json").read_text())["metrics"]
    rows = [json.loads(x) for x in (root / run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    comm = [r["comm_bytes_per_step"] for r in rows if "comm_bytes_per_step" in r]
    return {"initial_eval": record["phase0_initial_eval_loss"], "final_eval": record["phase0_final_eval_loss"],
            "comm_bytes_first": comm[0], "comm_bytes_last": comm[-1]}


def main() -> None:
    root, base = Path(sys.argv[1]), sys.argv[2]
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else REPO / "bench" / "results"
    result = {"device": torch.cuda.get_device_name(0), "packing_matches_cpu": packing_matches(),
              "cuda_drift_over_error": compressor_on_cuda(),
              **{name: pretrain(root, base, name) for name in ("onebit_adam", "onebit_lamb")}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_onebit_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
