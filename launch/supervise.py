"""supervise.py COMMAND...: run a launcher (deepspeed) so that a stop signal reaches every rank and
nothing outlives it.

DeepSpeed's runner does not forward signals on one node (its child launcher and the ranks keep
running when it is killed), its launcher forwards only SIGINT/SIGTERM and SIGKILLs ranks 30 s
later, and SIGUSR1 (Slurm's early warning) kills both outright. So this wrapper starts the launcher
in its own session and, on SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP, sends the signal to the ranks
themselves (the `python -m pipeline` processes of the session): they finish the step, save and exit
with code 75, and the launcher follows. If the session is still alive after PIPELINE_STOP_GRACE_S
seconds (default 600) it is killed; when the launcher exits, whatever is left of the session is
killed too. The exit code is the launcher's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def ranks_of(pid: int) -> list[psutil.Process]:
    ranks = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1] == "pipeline":
            ranks.append(child)
    return ranks


def kill_session(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(command: list[str]) -> int:
    launcher = subprocess.Popen(command, start_new_session=True)
    grace = float(os.environ.get("PIPELINE_STOP_GRACE_S", 600))
    timers: list[threading.Timer] = []

    def forward(signum: int, frame) -> None:
        ranks = ranks_of(launcher.pid)
        for rank in ranks:
            try:
                rank.send_signal(signum)
            except psutil.Error:
                pass
        if not ranks:  # nothing started yet (or already gone): stop the launcher itself
            kill_session(launcher.pid)
        if not timers:
            timers.append(threading.Timer(grace, kill_session, (launcher.pid,)))
            timers[0].daemon = True
            timers[0].start()

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = launcher.wait()
    kill_session(launcher.pid)  # no orphans: ranks, loaders, anything the launcher left
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
