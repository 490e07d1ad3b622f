"""launch/supervise.py: a stop signal when no rank is running (none yet, or all just finished)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.conftest import REPO


def _supervised(seconds: float) -> subprocess.Popen:
    """supervise.py in front of a 'launcher' that starts no rank and exits 0 after `seconds`."""
    launcher = [sys.executable, "-c", f"import time; time.sleep({seconds})"]
    return subprocess.Popen([sys.executable, str(REPO / "launch/supervise.py"), *launcher])


def test_a_signal_after_the_ranks_finished_lets_the_launcher_exit_with_their_code():
    proc = _supervised(2.0)
    time.sleep(0.8)
    proc.send_signal(signal.SIGUSR1)  # e.g. Slurm's warning, landing as the stage completes
    assert proc.wait(timeout=30) == 0


def test_a_launcher_with_no_rank_is_stopped_shortly_after_a_signal():
    proc = _supervised(60.0)
    time.sleep(0.8)
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL
    assert time.time() - started < 15
