"""Stop requests: signals and a deadline, agreed by every rank at a step boundary.

A preempted or time-limited job gets a signal (SIGTERM from a scheduler, SIGUSR1 from Slurm's
`--signal` ahead of the limit) or reaches `run.deadline`. Inside a training loop the handler only
sets a flag; once per step `agreed()` takes the largest reason code over the ranks (one all-reduce
of one integer), so all ranks stop after the same step, save the same checkpoint and exit together
(Megatron-LM stops on a signal the same way). Outside a training loop (preparing data, pruning,
between stages) there is no step to finish, so a signal stops the command at once, as `Stopped`.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as tdist

from pipeline.errors import Stopped

REASONS = {1: "a stop signal", 2: "the deadline"}


class StopRequests:
    def __init__(self, signals: list[str], deadline: float | None):
        self.deadline, self.received, self.listening = deadline, None, False
        self.signals = signals
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
        if self.received:
            return 1
        return 2 if self.deadline is not None and time.time() >= self.deadline else 0

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
