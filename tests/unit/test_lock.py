"""One job per stage of a run directory: refused with one line, stale locks taken over."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from pipeline.errors import StageInputError
from pipeline.lock import STALE_S, StageLock
from pipeline.rundir import host_name
from tests.conftest import REPO, run_cli

LOG = logging.getLogger("test")


def test_a_second_job_is_refused_with_the_holders_host_and_pid(tmp_path):
    first = StageLock(tmp_path / ".pretrain.lock", host_name(), LOG)
    first.acquire()
    with pytest.raises(StageInputError) as info:
        StageLock(tmp_path / ".pretrain.lock", host_name(), LOG).acquire()
    assert f"process {os.getpid()} on {host_name()}" in str(info.value) and "\n" not in str(info.value)
    first.release()
    assert not (tmp_path / ".pretrain.lock").exists()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".pretrain.lock").write_text(json.dumps({"host": host_name(), "pid": dead.pid, "since": 0}))
    with caplog.at_level(logging.WARNING):
        StageLock(tmp_path / ".pretrain.lock", host_name(), LOG).acquire()
    assert "stale lock" in caplog.text and f"process {dead.pid}" in caplog.text


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path):
    path = tmp_path / ".pretrain.lock"
    path.write_text(json.dumps({"host": "node07", "pid": 1234, "since": 0}))
    with pytest.raises(StageInputError, match="process 1234 on node07"):
        StageLock(path, host_name(), LOG).acquire()
    old = time.time() - STALE_S - 10
    os.utime(path, (old, old))  # its job died without releasing it, on a node we cannot ask
    StageLock(path, host_name(), LOG).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_the_cli_refuses_a_stage_another_job_holds(tmp_path):
    cfg = REPO / "configs" / "demo.yaml"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / ".prepare.lock").write_text(json.dumps({"host": host_name(), "pid": 1, "since": 0}))
    proc = run_cli("prepare", "--config", str(cfg), "--set", f"run.root={tmp_path}")
    assert proc.returncode == 2
    lock = tmp_path / "demo" / ".prepare.lock"
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1:] == [
        f"error: {tmp_path / 'demo'} is in use by process 1 on {host_name()} (lock {lock}); "
        "wait for it, or if no such job runs, delete the lock"], proc.stderr
