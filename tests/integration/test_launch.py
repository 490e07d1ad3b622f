"""Real launchers: two ranks through `deepspeed --hostfile hostfiles/localhost`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, write_config

DEEPSPEED = Path(sys.executable).parent / "deepspeed"


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_see_their_rank_and_world(tmp_path):
    out = tmp_path / "ranks.json"
    cmd = [str(DEEPSPEED), "--hostfile", "hostfiles/localhost", "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", "29731", "--module", "pipeline", "env", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    seen = json.loads(out.read_text())
    assert seen["allreduce_ok"]
    assert [(r["rank"], r["world_size"], r["local_rank"], r["launcher"]) for r in seen["ranks"]] == [
        (0, 2, 0, "deepspeed"), (1, 2, 1, "deepspeed")]
    assert len({r["pid"] for r in seen["ranks"]}) == 2


@pytest.mark.slow
def test_stage_through_the_launch_script_with_a_hostfile(tmp_path, bbc_sample):
    cfg = {"run": {"name": "ds", "root": str(tmp_path / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample / "politics")], "doc_split": "file"}],
                    "tokenizer": {"kind": "bert-base-uncased"}, "seq_lengths": [128], "unit_mb": 0.02,
                    "workers": 1}}
    config = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.run(["bash", "launch/run_stage.sh", "prepare", str(config), "hostfiles/localhost"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "runs/ds/prepare/stage.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2 and record["metrics"]["docs"] == 60


@pytest.mark.slow
def test_a_wrong_network_interface_is_one_line_per_rank_naming_the_setting():
    proc = subprocess.run(["bash", "launch/run_stage.sh", "env", "", "hostfiles/localhost"], cwd=REPO,
                          env=cli_env(GLOO_SOCKET_IFNAME="nosuch0"), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: rank")]
    assert len(lines) == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert all("GLOO_SOCKET_IFNAME=nosuch0" in line and "lo 127.0.0.1" in line for line in lines)
