"""One make target per stage: each runs its stage through launch/run_stage.sh (the README's commands)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, cli_env, write_config

STAGES = ("prepare", "pretrain", "search", "prune", "retrain", "finetune", "run-all")


def _make(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_target_ends_in_its_launch_line(stage):
    proc = _make("-n", stage, "CONFIG=configs/demo.yaml", "HOSTFILE=hostfiles/localhost")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.split() == ["bash", "launch/run_stage.sh", stage, "configs/demo.yaml", '"hostfiles/localhost"'], \
        proc.stdout[-2000:]


@pytest.mark.slow
def test_make_runs_each_stage_of_a_tiny_config(tmp_path, bbc_sample):
    """`make prepare`, then `make pretrain` on 2 ranks (hostfiles/localhost): each stage's record says complete
    (`make pretrain` once printed "Nothing to be done" and exited 0). The other targets share the recipe
    (above); `make demo` runs search, prune and retrain through the same launch script."""
    cfg = {"run": {"name": "made", "root": str(tmp_path / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample / "politics")], "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 1000}, "seq_lengths": [64],
                    "validation_fraction": 0.05, "unit_mb": 0.05, "workers": 1},
           "model": {"preset": "tiny", "max_position_embeddings": 64},
           "pretrain": {"phases": [{"seq_len": 64, "steps": 6, "global_batch_size": 16, "micro_batch_size": 8}],
                        "precision": "fp32", "checkpoint_every": 3, "eval_every": 3, "eval_batches": 1},
           "distributed": {"ds_config": str(REPO / "ds_configs/cpu_demo.json")}}
    config = write_config(tmp_path / "made.yaml", cfg)
    for stage, hostfile in (("prepare", ""), ("pretrain", "hostfiles/localhost")):
        proc = _make(stage, f"CONFIG={config}", f"HOSTFILE={hostfile}")
        assert proc.returncode == 0, (stage, proc.stdout[-2000:] + proc.stderr[-2000:])
        record = json.loads((tmp_path / "runs/made" / stage / "stage.json").read_text())
        assert record["status"] == "complete" and record["world_size"] == (2 if hostfile else 1), (stage, record)
