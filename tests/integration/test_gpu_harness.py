"""bench/gpu_pretrain.py, the GPU acceptance harness, run end to end on CPU at a tiny size, so that it
still works when a GPU session comes to run it (marked long: `make test-long`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env, run_cli, write_config


@pytest.mark.long
def test_the_gpu_benchmark_runs_its_variants_p4_and_the_attention_check_on_cpu(tmp_path, bbc_sample):
    root = tmp_path / "runs"
    config = write_config(tmp_path / "prep.yaml", {
        "run": {"name": "gb", "root": str(root)},
        "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample)], "doc_split": "file"}],
                 "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [128, 512],
                 "validation_fraction": 0.05, "unit_mb": 0.2, "workers": 1}})
    prepared = run_cli("prepare", "--config", str(config))
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_pretrain.py", str(root), "gb", "--preset", "tiny",
                           "--precision", "fp32", "--peak", "0.15", "--steps", "4", "--micro-scale", "0.0625",
                           "--only", "seq 512, static+compiled, micro 64", "--out", str(out)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "gpu_pretrain.md").read_text()
    assert "| seq 512, static+compiled, micro 64 |" in table and "failed" not in table
    assert "Attention kernel at seq 512: flash." in table  # CPU's flash kernel: packed rows carry no mask
    record = json.loads((out / "gpu_pretrain.json").read_text())
    assert record["seq 512, static+compiled, micro 64"]["device"] == "CPU"
    assert {"pruned_ratio", "pruned64_ratio"} <= set(record["step_profile"])  # P4 ran (its value is not a test)
