"""1-bit Adam / LAMB over gloo with 2 and 3 ranks: identical ranks, bounded error, real pretraining, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env, run_cli, write_config

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_compressed_allreduce_and_onebit_adam_across_ranks(tmp_path, ranks):
    out = tmp_path / "seen.json"
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", str(ranks), "--master_port", str(29700 + ranks),
                           str(Path(__file__).with_name("onebit_worker.py")), str(out)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    comp = seen["compress"]
    assert comp["identical"], "ranks got different averages"
    assert comp["drift"] < 2 * comp["step_error_scale"]  # 200 calls drift no more than ~one call's error
    assert comp["bytes_per_call"] <= comp["fp32_allreduce_bytes"] / 16
    for name in ("adam", "lamb"):
        run = seen[name]
        assert run["identical"], f"ranks hold different parameters after a 1-bit {name} step"
        assert run["compressing"] and run["allreduce_on"] is False and run["bytes_sent"] > 0
        assert sum(run["losses"][-3:]) < sum(run["losses"][:3]), (name, run["losses"])


def _config(tmp_path: Path, bbc_sample: Path, name: str, optimizer: dict, ds: str) -> Path:
    cfg = {"run": {"name": name, "root": str(tmp_path / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample)], "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [64],
                    "validation_fraction": 0.05, "unit_mb": 0.2, "workers": 1},
           "model": {"preset": "tiny", "max_position_embeddings": 64},
           "optimizer": optimizer, "schedule": {"warmup": 0.1},
           "pretrain": {"phases": [{"seq_len": 64, "steps": 40, "global_batch_size": 32, "micro_batch_size": 8}],
                        "precision": "fp32", "checkpoint_every": 10, "eval_every": 20, "eval_batches": 4,
                        "log_every": 1},
           "distributed": {"ds_config": str(REPO / "ds_configs" / ds)}}
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _launch(config: Path, *args: str, **popen) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29720", "-m", "pipeline", *args, "--config",
           str(config)]
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen)


def _run(config: Path, *args: str) -> None:
    proc = _launch(config, *args)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_onebit_adam_pretraining_matches_adam_and_resumes_exactly(tmp_path, bbc_sample):
    adam = _config(tmp_path, bbc_sample, "adam", {"name": "adamw", "lr": 1e-3}, "pretrain_onebit_adam.json")
    onebit = {"name": "onebit_adam", "lr": 1e-3, "freeze_step": 20}  # half the run in full precision
    straight = _config(tmp_path, bbc_sample, "onebit", onebit, "pretrain_onebit_adam.json")
    killed = _config(tmp_path, bbc_sample, "killed", onebit, "pretrain_onebit_adam.json")
    for config in (adam, straight, killed):
        assert run_cli("prepare", "--config", str(config)).returncode == 0
    _run(adam, "pretrain")
    _run(straight, "pretrain")
    stage = tmp_path / "runs/killed/pretrain"
    proc = _launch(killed, "pretrain")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill after the step-30 checkpoint, mid-compression
        metrics = stage / "metrics.jsonl"
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= 34:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _run(killed, "pretrain")
    final = {}
    for name in ("adam", "onebit", "killed"):
        record = json.loads((tmp_path / "runs" / name / "pretrain/stage.json").read_text())
        assert record["status"] == "complete"
        final[name] = record["metrics"]["phase0_final_eval_loss"]
    start = record["metrics"]["phase0_initial_eval_loss"]
    assert final["onebit"] < start - 0.3
    assert abs(final["onebit"] - final["adam"]) < 0.1 * (start - final["adam"])  # within 10% of Adam's progress
    a = load_file(tmp_path / "runs/onebit/pretrain/export/model.safetensors")
    b = load_file(stage / "export/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed 1-bit run differs from the uninterrupted one"
    logged = [json.loads(line) for line in (tmp_path / "runs/onebit/pretrain/metrics.jsonl").read_text().splitlines()]
    compressed = [r["comm_bytes_per_step"] for r in logged if r.get("step", 0) > 22 and "comm_bytes_per_step" in r]
    dense = [r["comm_bytes_per_step"] for r in logged if 2 <= r.get("step", 0) <= 19 and "comm_bytes_per_step" in r]
    assert compressed and dense and max(compressed) <= min(dense) / 16


def test_onebit_with_zero_is_refused(tmp_path, bbc_sample):
    config = _config(tmp_path, bbc_sample, "z", {"name": "onebit_lamb", "freeze_step": 5}, "cpu_demo.json")
    assert run_cli("prepare", "--config", str(config)).returncode == 0
    proc = run_cli("pretrain", "--config", str(config))
    assert proc.returncode == 2
    assert "zero_optimization.stage=1 with a 1-bit optimizer" in proc.stderr.strip().splitlines()[-1]
