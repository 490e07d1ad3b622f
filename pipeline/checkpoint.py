"""Checkpoints on shared storage: DeepSpeed's own files plus what exact resume needs.

    checkpoints/p0-s0000500/         DeepSpeed checkpoint (model, optimizer partitions, scheduler,
                                     client state: loader position, phase, step, tokens seen)
    checkpoints/p0-s0000500/rank1.pt  each rank's RNG states (dropout differs per rank) and its own
                                     optimizer state (1-bit error feedback)
    checkpoints/p0-s0000500/manifest.json  every file's size and sha256 and the position, written
                                     by rank 0 after all ranks' files, through a temporary name
    checkpoints/latest.json          the newest complete checkpoint, written last by rank 0
    checkpoints/phase0.json          a finished phase's summary (eval losses, steps), kept for the
                                     stage record even after its checkpoints are pruned
A checkpoint exists only once its manifest does; `latest.json` only names one with a manifest.
On resume (`resume_point`) rank 0 verifies the named checkpoint against its manifest: a damaged
one is set aside as `<tag>.damaged` and named in the log, and the newest older checkpoint that
verifies takes its place; a missing or unreadable `latest.json` is rebuilt from the checkpoints on
disk, never taken as a fresh start; folders without a manifest (a save that was cut short) are
removed. The oldest ones beyond `keep` are deleted after a new one is named.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.dist import Dist
from pipeline.errors import StageInputError
from pipeline.rundir import atomic_write_json, sha256_file

LATEST = "latest.json"
MANIFEST = "manifest.json"
TAG = re.compile(r"^p\d+-s\d{7}$")


@dataclass(frozen=True)
class Position:
    phase: int
    step: int  # optimizer steps done in this phase
    tag: str
    phase_done: bool
    world_size: int = 0  # the ranks that saved it (0: not recorded, taken as the current number)

    def resharded(self, world_size: int) -> bool:
        return self.world_size not in (0, world_size)


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
    """Every rank's files, then (rank 0) the manifest and `latest.json`. A full disk on any rank fails the save
    on every rank at once, with that rank's line, and the half-written folder is removed once no rank is
    writing to it any more; the previous checkpoint stays the one named."""
    directory = Path(directory)
    problem = None
    try:
        engine.save(directory, position.tag, client_state)
    except (OSError, RuntimeError) as exc:
        problem = _disk_full_or_raise(exc, directory, position.tag, dist)
        # the files are written between DeepSpeed's tag check and the barrier its save ends with, where the
        # other ranks now wait: meet them there, so every rank reaches the agreement below
        dist.barrier()
    if problem is None:
        try:
            torch.save({"rng": rng_state(), "optimizer": engine.rank_state()},
                       directory / position.tag / f"rank{dist.rank}.pt")
        except (OSError, RuntimeError) as exc:
            problem = _disk_full_or_raise(exc, directory, position.tag, dist)
    problems = [p for p in dist.all_gather_object(problem) if p]  # also: every rank's files are written
    if problems:
        if dist.is_main:
            shutil.rmtree(directory / position.tag, ignore_errors=True)  # room for the stage record; never named
        dist.barrier()
        raise StageInputError(problems[0])
    if dist.is_main:
        write_manifest(directory / position.tag, position)
        atomic_write_json(directory / LATEST, position.__dict__)
        _prune(directory, keep)
    dist.barrier()


def _disk_full_or_raise(exc: BaseException, directory: Path, tag: str, dist: Dist) -> str:
    full = _disk_full(exc, directory, tag)
    if full is None:
        raise exc
    return f"rank {dist.rank}: {full}" if dist.world_size > 1 else full


def _disk_full(exc: BaseException, directory: Path, tag: str) -> str | None:
    """The one line for a save that ran out of space, or None if `exc` is something else."""
    # the folder written to, which may sit on another filesystem than its parent (a quota, a mount)
    free = shutil.disk_usage(directory / tag if (directory / tag).is_dir() else directory).free
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    no_space = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain)
    # torch's zip writer reports a full disk without the errno ("file write failed", "unexpected pos")
    if not (no_space or (isinstance(exc, RuntimeError) and free < 64 << 20)):
        return None
    sizes = [sum(f["bytes"] for f in json.loads((p / MANIFEST).read_text())["files"].values())
             for p in sorted((p for p in directory.iterdir() if TAG.match(p.name)), key=_order)
             if (p / MANIFEST).is_file()]
    need = f"about {sizes[-1] / 1e6:,.0f} MB (the previous checkpoint's size)" if sizes else "more"
    return (f"{directory}: no space left on device while saving a checkpoint: it needs {need}, "
            f"{free / 1e6:,.0f} MB are free; the previous checkpoint is intact: free space and run the same "
            "command to resume")


def write_manifest(folder: Path, position: Position) -> None:
    """Sizes and sha256 of every file in the checkpoint (read back from shared storage: what a resume will
    read), with the position, so `latest.json` can be rebuilt from the folder alone."""
    files = {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}
    atomic_write_json(folder / MANIFEST, {"position": position.__dict__, "files": files})


def verify(folder: Path) -> str | None:
    """None if every file the manifest lists is there with its size and checksum, else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (the save did not finish)"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if sha256_file(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def resume_point(directory: Path, dist: Dist, log) -> Position | None:
    """The verified checkpoint to resume from (None: start fresh), the same on every rank."""
    decision = _choose(Path(directory), log) if dist.is_main else None
    decision = dist.broadcast_object(decision)
    if isinstance(decision, str):
        raise StageInputError(decision)
    return Position(**decision) if decision else None


def _choose(directory: Path, log) -> dict | str | None:
    """Rank 0's decision: a position, None for a fresh start, or the one line to stop with."""
    if not directory.is_dir():
        return None
    named, problem = _read_latest(directory)
    folders = sorted((p for p in directory.iterdir() if p.is_dir() and TAG.match(p.name)), key=_order,
                     reverse=True)
    for folder in folders:
        if not (folder / MANIFEST).exists() and (named is None or folder.name != named["tag"]):
            shutil.rmtree(folder, ignore_errors=True)  # a save cut short: never named, never complete
            log.warning(f"removed {folder}: a checkpoint whose save did not finish")
    candidates = [f for f in folders if f.exists()]
    if named is None and not candidates:
        if problem:
            log.warning(f"{directory / LATEST}: {problem}, and no checkpoint is on disk: starting fresh")
        return None
    if named is None:
        problem = problem or f"{LATEST} is missing"
    for folder in candidates:  # newest first: a verified folder is complete even if the kill came before naming it
        if named is not None and folder.name == named["tag"] and not (folder / MANIFEST).exists():
            # named by latest.json, so complete, but saved by a version that wrote no manifests
            write_manifest(folder, Position(**named))
            log.warning(f"checkpoint {folder} has no manifest (an earlier version saved it): trusted, manifest "
                        "written")
            return named
        reason = verify(folder)
        if reason is None:
            position = json.loads((folder / MANIFEST).read_text())["position"]
            if named is None or position["tag"] != named["tag"]:
                log.warning(f"resuming from {folder} ({problem or 'the newest verified checkpoint'})")
                atomic_write_json(directory / LATEST, position)
            return position
        damaged = folder.with_name(folder.name + ".damaged")
        shutil.rmtree(damaged, ignore_errors=True)
        folder.rename(damaged)
        problem = f"{folder.name} is damaged: {reason}; set aside as {damaged.name}"
        log.warning(f"checkpoint {folder}: {reason}; set aside as {damaged}")
    return (f"{directory}: no checkpoint verifies against its manifest ({problem}); remove {directory} to "
            "restart the stage from step 0")


def _read_latest(directory: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads((directory / LATEST).read_text())
        return {**{k: data[k] for k in ("phase", "step", "tag", "phase_done")},
                "world_size": data.get("world_size", 0)}, None
    except FileNotFoundError:
        return None, None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None, f"{LATEST} is unreadable"


def universal(directory: Path, position: Position, dist: Dist, convert, log) -> tuple[Path, str]:
    """Where to load a checkpoint saved by another number of ranks from: its ZeRO partitions re-cut per
    parameter (DeepSpeed's universal format, converted once by rank 0 into `<tag>/universal`), or the
    checkpoint itself where nothing is partitioned (ZeRO stage 0 in fp32 saves whole optimizer states)."""
    folder = Path(directory) / position.tag
    if not any(folder.glob("*optim_states.pt")):
        return Path(directory), position.tag
    target = folder / "universal"
    problem = None
    if dist.is_main and not target.is_dir():
        log.info(f"{folder}: saved by {position.world_size} rank(s), resuming on {dist.world_size}: converting "
                 "its ZeRO partitions to DeepSpeed's universal checkpoint")
        staging = folder / "universal.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            convert(folder, staging)
            staging.rename(target)  # a conversion cut short is never taken as done
        except StageInputError as exc:
            problem = str(exc)
    problem = dist.broadcast_object(problem)
    if problem:
        raise StageInputError(problem)
    return folder, "universal"


def restore_rank_state(engine, directory: Path, tag: str, dist: Dist) -> None:
    state = torch.load(Path(directory) / tag / f"rank{dist.rank}.pt", weights_only=False)
    set_rng_state(state["rng"])
    engine.load_rank_state(state["optimizer"])


def _order(folder: Path) -> tuple[int, int]:
    """(phase, step) as numbers: `p10-...` comes after `p9-...` (finetune counts epochs as phases)."""
    phase, step = folder.name[1:].split("-s")
    return int(phase), int(step)


def _prune(directory: Path, keep: int) -> None:
    tags = sorted((p for p in directory.iterdir() if p.is_dir() and TAG.match(p.name)), key=_order)
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
