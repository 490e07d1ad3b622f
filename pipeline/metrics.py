"""Training metrics: per-interval averages across ranks, and the JSONL log in the stage directory."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as tdist

from pipeline.rundir import atomic_write_text


class StepStats:
    """Accumulates step results between two log lines; `flush` averages them over steps and ranks.

    Sums stay on the device and time is taken per interval, so logging adds no per-step sync.
    """

    def __init__(self):
        self._sums: torch.Tensor | None = None
        self._steps = 0
        self._micro = 0
        self._digest = 0
        self._started = time.perf_counter()

    def restart_clock(self) -> None:
        """After evaluation or a checkpoint: that time is not training throughput."""
        self._started = time.perf_counter()

    def add(self, result: dict) -> None:
        sums = result["sums"].double()
        self._sums = sums if self._sums is None else self._sums + sums
        self._steps += 1
        self._micro += result["micro"]
        self._digest = zlib.crc32(result["rows_digest"].to_bytes(4, "little"), self._digest)

    def flush(self, dist) -> dict:
        sums = self._sums.clone()
        if dist.world_size > 1:
            tdist.all_reduce(sums)
        loss, weighted, correct, masked = sums.tolist()  # the one sync of the interval
        seconds = time.perf_counter() - self._started
        micro = self._micro * dist.world_size
        out = {"loss": loss / max(micro, 1), "mlm_loss": weighted / max(masked, 1), "mlm_acc": correct / max(masked, 1),
               "seconds_per_step": seconds / max(self._steps, 1), "rows_digest": self._digest, "steps": self._steps}
        self.__init__()
        return out


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, written by rank 0 only."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = Path(path), is_main

    def truncate_after(self, position) -> None:
        """Drop lines a killed run wrote after its last checkpoint: the resumed run writes them again."""
        if not self.is_main or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            if position is not None and (record["phase"], record["step"]) <= (position.phase, position.step):
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.is_main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
