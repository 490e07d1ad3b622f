"""A pretraining that needs about three job-lengths, submitted once to a real (one-node) Slurm.

Each job gets the warning signal before its time limit, the stage saves and stops, the job
requeues itself, and the next job resumes: the chain ends with the same weights as one
uninterrupted run (bit-identical on CPU). The data is prepared by the prepare script's job first.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env, write_config

slurm = pytest.importorskip("tests.slurm")

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.cluster]
STEPS = 240  # ~100 s of training on 2 ranks here; a job trains ~40 s of it before its warning signal


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm.unavailable()
    if reason:
        pytest.skip(f"slurm: {reason}")
    one = slurm.OneNodeSlurm(tmp_path_factory.mktemp("slurm"), max_minutes=3)
    yield one
    one.close()


def _config(root: Path, name: str) -> Path:
    cfg = {"run": {"name": name, "root": str(root / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(REPO / ".cache/corpora/bbc/politics")],
                                 "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [128],
                    "validation_fraction": 0.05, "unit_mb": 0.05, "workers": 1},
           "model": {"preset": "mini", "num_layers": 2, "max_position_embeddings": 128, "dropout": 0.0},
           "optimizer": {"name": "lamb", "lr": 3e-3},
           "schedule": {"warmup": 0.1},
           "pretrain": {"phases": [{"seq_len": 128, "steps": STEPS, "global_batch_size": 32, "micro_batch_size": 16}],
                        "precision": "fp32", "checkpoint_every": 50, "keep_last": 2, "eval_every": 80,
                        "eval_batches": 2, "log_every": 10},
           "distributed": {"ds_config": str(REPO / "ds_configs/cpu_demo.json")}}
    return write_config(root / f"{name}.yaml", cfg)


def _wait(cluster, job: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = cluster.state(job)
        if state.split()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(2)
    raise AssertionError(f"job {job} not done after {timeout:.0f} s: {cluster.state(job)}")


def test_a_pretraining_longer_than_a_job_completes_through_requeues_with_the_uninterrupted_weights(cluster,
                                                                                                   tmp_path):
    config = _config(tmp_path, "chain")
    env_root = tmp_path / "logs"
    env_root.mkdir()
    prepare = cluster.sbatch("--time=2", "--nodes=1", "-o", str(env_root / "prepare.out"),
                             str(REPO / "launch/slurm/prepare.sbatch"), str(config), cwd=REPO)
    assert _wait(cluster, prepare, 180).startswith("COMPLETED"), (env_root / "prepare.out").read_text()[-3000:]

    log = env_root / "pretrain.out"
    job = cluster.sbatch("--time=2", "--signal=B:USR1@60", "--nodes=1", "--ntasks-per-node=2", "-o", str(log),
                         str(REPO / "launch/slurm/pretrain.sbatch"), str(config), cwd=REPO)
    state = _wait(cluster, job, 900)
    text = log.read_text()
    assert state.startswith("COMPLETED"), text[-4000:]
    starts = re.findall(r"start (\d+) of the chain", text)
    assert len(starts) >= 3 and starts == [str(i + 1) for i in range(len(starts))], text[-4000:]
    assert text.count("requeueing job") == len(starts) - 1
    assert f"restarts={len(starts) - 1}" in state
    assert not cluster.run("squeue", "-h").stdout.strip()
    stage = tmp_path / "runs/chain/pretrain"
    assert json.loads((stage / "stage.json").read_text())["status"] == "complete"

    # the same run in one go, from the same prepared data
    straight = _config(tmp_path, "straight")
    shutil.copytree(tmp_path / "runs/chain/prepare", tmp_path / "runs/straight/prepare")
    proc = subprocess.run(["bash", "launch/run_stage.sh", "pretrain", str(straight), "hostfiles/localhost"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    a = load_file(stage / "export/model.safetensors")
    b = load_file(tmp_path / "runs/straight/pretrain/export/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the chain's weights differ from the uninterrupted run's"
