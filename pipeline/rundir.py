"""The run directory on shared storage: `<root>/<run>/<stage>/...` plus a `stage.json` per stage.

`stage.json` is the only thing that says a stage finished. It is written atomically (temp
file, fsync, rename, fsync of the directory), so a crash at any moment leaves either the old
record or the new one, never a torn one, and never a "complete" record ahead of its outputs:
outputs are written and fsynced first, the record last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

Status = Literal["running", "complete", "failed", "stopped"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too (POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class OutputFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sha256: str
    bytes: int


class StageRecord(BaseModel):
    """What `stage.json` holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stage: str
    status: Status
    config_hash: str
    inputs: dict[str, str] = {}  # input name -> content hash
    outputs: dict[str, OutputFile] = {}  # path relative to the stage dir -> hash, size
    metrics: dict[str, Any] = {}
    started_at: str
    ended_at: str | None = None
    world_size: int = 1
    host: str = ""
    error: str | None = None
    settings: dict[str, Any] = {}  # the fields the config hash covers, by dotted name (to say what changed)
    runtime: dict[str, Any] = {}  # the stage's RUNTIME fields as this run had them
    runtime_changes: list[str] = []  # RUNTIME fields changed on a resume: 'when field: old -> new'

    def fingerprint(self) -> str:
        """The content hash a downstream stage records for this stage as its input."""
        return sha256_json({k: v.sha256 for k, v in self.outputs.items()})


class RunDir:
    """One run's directory; every rank on every node constructs the same one."""

    def __init__(self, root: Path, name: str):
        self.path = Path(root).absolute() / name  # a relative root means: from where we were started

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def record_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "stage.json"

    def read_record(self, stage: str) -> StageRecord | None:
        path = self.record_path(stage)
        try:
            return StageRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValidationError, ValueError):
            return None  # unreadable counts as absent: the stage reruns

    def write_record(self, record: StageRecord) -> None:
        atomic_write_text(self.record_path(record.stage), record.model_dump_json(indent=2) + "\n")

    def missing_outputs(self, record: StageRecord) -> list[str]:
        """Outputs listed in the record that are absent or of the wrong size (cheap check)."""
        stage_dir = self.stage_dir(record.stage)
        missing = []
        for rel, info in record.outputs.items():
            path = stage_dir / rel
            if not path.is_file() or path.stat().st_size != info.bytes:
                missing.append(rel)
        return missing

    def is_complete(self, stage: str) -> bool:
        record = self.read_record(stage)
        return record is not None and record.status == "complete" and not self.missing_outputs(record)

    def describe_output(self, stage: str, paths: list[Path]) -> dict[str, OutputFile]:
        stage_dir = self.stage_dir(stage)
        described = {}
        for path in sorted(paths):
            path = Path(path)
            rel = path.relative_to(stage_dir) if path.is_absolute() else path
            full = stage_dir / rel
            described[rel.as_posix()] = OutputFile(sha256=sha256_file(full), bytes=full.stat().st_size)
        return described


def host_name() -> str:
    return socket.gethostname()
