"""Checkpoints on shared storage: DeepSpeed's own files plus what exact resume needs.

    checkpoints/p0-s0000500/         DeepSpeed checkpoint (model, optimizer partitions, scheduler,
                                     client state: loader position, phase, step, tokens seen)
    checkpoints/p0-s0000500/rank1.pt  each rank's RNG states (dropout differs per rank) and its own
                                     optimizer state (1-bit error feedback)
    checkpoints/latest.json          the newest complete checkpoint, written last by rank 0
    checkpoints/phase0.json          a finished phase's summary (eval losses, steps), kept for the
                                     stage record even after its checkpoints are pruned
A checkpoint exists only once `latest.json` names it: a kill during saving leaves the
previous one in charge. The oldest ones beyond `keep` are deleted after a new one is named.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.dist import Dist
from pipeline.rundir import atomic_write_json

LATEST = "latest.json"


@dataclass(frozen=True)
class Position:
    phase: int
    step: int  # optimizer steps done in this phase
    tag: str
    phase_done: bool


def tag_for(phase: int, step: int) -> str:
    return f"p{phase}-s{step:07d}"


def latest(directory: Path) -> Position | None:
    try:
        data = json.loads((Path(directory) / LATEST).read_text())
    except FileNotFoundError:
        return None
    return Position(**data)


def save_phase_summary(directory: Path, phase: int, summary: dict) -> None:
    atomic_write_json(Path(directory) / f"phase{phase}.json", summary)


def phase_summary(directory: Path, phase: int) -> dict:
    """What a phase finished by an earlier (killed) run reported, so the stage record stays complete."""
    try:
        return json.loads((Path(directory) / f"phase{phase}.json").read_text())
    except FileNotFoundError:
        return {}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, directory: Path, position: Position, client_state: dict, dist: Dist, keep: int) -> None:
    directory = Path(directory)
    engine.save(directory, position.tag, client_state)
    torch.save({"rng": rng_state(), "optimizer": engine.rank_state()}, directory / position.tag / f"rank{dist.rank}.pt")
    dist.barrier()  # every rank's files are written before the checkpoint is named
    if dist.is_main:
        atomic_write_json(directory / LATEST, position.__dict__)
        _prune(directory, keep)
    dist.barrier()


def restore_rank_state(engine, directory: Path, tag: str, dist: Dist) -> None:
    state = torch.load(Path(directory) / tag / f"rank{dist.rank}.pt", weights_only=False)
    set_rng_state(state["rng"])
    engine.load_rank_state(state["optimizer"])


def _prune(directory: Path, keep: int) -> None:
    tags = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("p"))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
