"""Stop requests: signals and a deadline, agreed by every rank at a step boundary.

A preempted or time-limited job gets a signal (SIGTERM from a scheduler, SIGUSR1 from Slurm's
`--signal` ahead of the limit) or reaches `run.deadline`. Inside a training loop the handler only
sets a flag; once per step `agreed()` takes the largest reason code over the ranks (one all-reduce
of one integer), so all ranks stop after the same step, save the same checkpoint and exit together
(Megatron-LM stops on a signal the same way). Outside a training loop (preparing data, pruning,
between stages) there is no step to finish, so a signal stops the command at once, as `Stopped`.

A signal to the launching command cannot reach ranks it did not start: under a multi-node launcher
(pdsh over ssh, mpirun) every rank, the first host's too, is a child of a remote shell. So
`launch/supervise.py` also writes a stop file in the run directory (shared storage) and names it in
PIPELINE_STOP_FILE, which every rank reads from its environment: a rank that sees the file stops
as if signalled, and the all-reduce carries that to the ranks that did not look yet.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as tdist

from pipeline.errors import Stopped

REASONS = {1: "a stop signal", 2: "the deadline"}
STOP_FILE_ENV = "PIPELINE_STOP_FILE"
STOP_FILE_EVERY_S = 1.0  # a stat on shared storage at most this often, not once per step


class StopRequests:
    def __init__(self, signals: list[str], deadline: float | None, stop_file: str | None = None):
        self.deadline, self.received, self.listening = deadline, None, False
        self.signals = signals
        self.stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV) or None
        self._file_checked = 0.0
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)

    def close(self) -> None:
        """The command is over (its record written, its one line on the way): a signal now, e.g. the
        launcher cleaning up after a lost rank, must not raise inside the interpreter's exit."""
        for name in self.signals:
            signal.signal(getattr(signal, name), signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        if not self.listening:  # no step to finish: stop here, the stage record says so
            raise Stopped(f"{self.received} received outside a training step; run the same command to resume")

    def local_code(self) -> int:
        if self.received or self._stop_file_seen():
            return 1
        return 2 if self.deadline is not None and time.time() >= self.deadline else 0

    def _stop_file_seen(self) -> bool:
        if not self.stop_file or time.monotonic() - self._file_checked < STOP_FILE_EVERY_S:
            return False
        self._file_checked = time.monotonic()
        if os.path.exists(self.stop_file):
            self.received = "a stop signal to the launching command"
        return self.received is not None

    def agreed(self, world_size: int) -> str | None:
        """Why every rank stops now, or None. Every rank must call it at the same step."""
        code = self.local_code()
        if world_size > 1:
            box = torch.tensor([code], dtype=torch.int32)
            tdist.all_reduce(box, op=tdist.ReduceOp.MAX)
            code = int(box.item())
        if code == 1 and self.received:
            return self.received
        return REASONS.get(code)
