"""Run directory: atomic records, completeness checks, and records that survive kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from pipeline.rundir import OutputFile, RunDir, StageRecord, atomic_write_json, now_iso
from tests.conftest import REPO


def _record(status: str, **kw) -> StageRecord:
    return StageRecord(stage="prepare", status=status, config_hash="c", started_at=now_iso(), **kw)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]


def test_record_round_trip_and_corrupt_record_counts_as_absent(tmp_path):
    run = RunDir(tmp_path, "r")
    out = run.stage_dir("prepare") / "m.json"
    out.parent.mkdir(parents=True)
    out.write_text("{}")
    run.write_record(_record("complete", outputs=run.describe_output("prepare", [out])))
    assert run.read_record("prepare").status == "complete" and run.is_complete("prepare")
    run.record_path("prepare").write_text('{"stage": "prepare", "status": "compl')
    assert run.read_record("prepare") is None and not run.is_complete("prepare")


def test_missing_or_resized_output_is_not_complete(tmp_path):
    run = RunDir(tmp_path, "r")
    out = run.stage_dir("prepare") / "m.json"
    out.parent.mkdir(parents=True)
    out.write_text("{}")
    run.write_record(_record("complete", outputs={"m.json": OutputFile(sha256="x", bytes=2)}))
    assert run.is_complete("prepare")
    out.write_text("{1}")
    assert run.missing_outputs(run.read_record("prepare")) == ["m.json"]
    out.unlink()
    assert not run.is_complete("prepare")


WRITER = textwrap.dedent("""
    import sys
    from pipeline.rundir import RunDir, StageRecord, now_iso
    run = RunDir(sys.argv[1], "r")
    big = {f"metric_{i}": "x" * 200 for i in range(2000)}   # ~0.5 MB: many write() calls
    print("ready", flush=True)
    i = 0
    while True:
        status = "running" if i % 2 else "complete"
        run.write_record(StageRecord(stage="prepare", status=status, config_hash=str(i),
                                     started_at=now_iso(), metrics=big))
        i += 1
""")


def test_kill_during_record_writes_never_leaves_a_torn_record(tmp_path):
    """kill -9 at arbitrary moments of a write loop: the record always parses whole."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.037 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        record = RunDir(tmp_path, "r").read_record("prepare")
        if record is not None:  # None only if killed before the first write finished
            assert record.status in ("running", "complete") and len(record.metrics) == 2000
