"""Checkpoints are never half-trusted: manifests, damaged newest, missing or unreadable latest.json."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline import checkpoint
from pipeline.checkpoint import Position, resume_point, tag_for, verify, write_manifest
from pipeline.dist import Dist, detect
from pipeline.errors import StageInputError
from pipeline.rundir import atomic_write_json

LOG = logging.getLogger("test")


def _save(directory, step: int, phase: int = 0) -> Position:
    """A checkpoint as `checkpoint.save` leaves it: files, then the manifest, then latest.json."""
    position = Position(phase, step, tag_for(phase, step), False)
    folder = directory / position.tag
    (folder / "global_step").mkdir(parents=True)
    (folder / "global_step" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * (step + 1))
    (folder / "rank0.pt").write_bytes(b"rng" * step)
    write_manifest(folder, position)
    atomic_write_json(directory / checkpoint.LATEST, position.__dict__)
    return position


@pytest.fixture
def dist():
    return Dist(detect({}))


def test_a_saved_checkpoint_verifies_and_is_the_resume_point(tmp_path, dist):
    _save(tmp_path, 4)
    newest = _save(tmp_path, 8)
    assert verify(tmp_path / newest.tag) is None
    assert resume_point(tmp_path, dist, LOG) == newest


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_previous_one_used(tmp_path, dist, caplog, damage):
    older = _save(tmp_path, 4)
    newest = _save(tmp_path, 8)
    target = tmp_path / newest.tag / "global_step" / "mp_rank_00_model_states.pt"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit changed
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, dist, LOG) == older
    assert newest.tag in caplog.text and "mp_rank_00_model_states.pt" in caplog.text
    assert (tmp_path / f"{newest.tag}.damaged").is_dir() and not (tmp_path / newest.tag).exists()
    assert json.loads((tmp_path / checkpoint.LATEST).read_text())["tag"] == older.tag


@pytest.mark.parametrize("latest", ["missing", "truncated"])
def test_latest_json_is_rebuilt_from_the_verified_checkpoints_never_a_fresh_start(tmp_path, dist, caplog, latest):
    _save(tmp_path, 4)
    newest = _save(tmp_path, 8)
    path = tmp_path / checkpoint.LATEST
    if latest == "missing":
        path.unlink()
    else:
        path.write_text(path.read_text()[:10])
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, dist, LOG) == newest
    assert checkpoint.LATEST in caplog.text
    assert checkpoint.latest(tmp_path) == newest


def test_a_folder_whose_save_was_cut_short_is_removed(tmp_path, dist):
    named = _save(tmp_path, 4)
    partial = tmp_path / tag_for(0, 8)
    partial.mkdir()
    (partial / "rank0.pt").write_bytes(b"half")
    assert resume_point(tmp_path, dist, LOG) == named
    assert not partial.exists()


def test_no_verified_checkpoint_left_is_one_line_naming_the_directory(tmp_path, dist):
    only = _save(tmp_path, 4)
    (tmp_path / only.tag / "rank0.pt").write_bytes(b"x")
    with pytest.raises(StageInputError) as info:
        resume_point(tmp_path, dist, LOG)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and "rank0.pt" in message


def test_no_checkpoints_at_all_is_a_fresh_start(tmp_path, dist):
    assert resume_point(tmp_path / "checkpoints", dist, LOG) is None
    (tmp_path / "checkpoints").mkdir()
    assert resume_point(tmp_path / "checkpoints", dist, LOG) is None


def test_a_stop_signal_waits_for_the_step_inside_training_and_stops_at_once_outside():
    import os
    import signal

    from pipeline.errors import Stopped
    from pipeline.stopping import StopRequests

    stop = StopRequests(["SIGUSR1", "SIGTERM"], deadline=None)
    try:
        stop.listening = True
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed(world_size=1) == "SIGUSR1"  # the flag, acted on at the step boundary
        stop.listening, stop.received = False, None
        with pytest.raises(Stopped, match="SIGTERM received outside a training step"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        passed = StopRequests([], deadline=0.0)
        assert passed.agreed(world_size=1) == "the deadline"
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
