"""Shard files: fixed-length rows of token ids, raw and memory-mappable, plus the manifest.

Layout inside the prepare stage directory:
    shards/L<seq_len>/<split>/<unit>.bin        rows of seq_len token ids (uint16 when the vocab fits)
    shards/L<seq_len>/<split>/<unit>.pairs.bin  NSP/SOP only: per row (segment B start, label), uint16
    units/<unit>.json                            a unit's files, counts and checksums: its completion mark
    manifest.json                                everything above, written by rank 0 when all units are done
A raw `.bin` (not .npy, not Arrow) because it is the simplest thing every tool can memory-map,
and its size alone says how many rows it holds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pipeline.rundir import fsync_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ShardWriter:
    """Appends rows to `<path>.tmp`, hashing as it goes; `close()` makes the file appear whole."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._handle = open(self._tmp, "wb")
        self._digest = hashlib.sha256()
        self.rows = 0
        self.bytes = 0

    def write(self, rows: np.ndarray) -> None:
        blob = np.ascontiguousarray(rows).tobytes()
        self._handle.write(blob)
        self._digest.update(blob)
        self.rows += len(rows)
        self.bytes += len(blob)

    def close(self) -> dict:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return {"sha256": self._digest.hexdigest(), "bytes": self.bytes, "rows": self.rows}


def shard_path(root: Path, seq_len: int, split: str, unit: str, pairs: bool = False) -> Path:
    suffix = ".pairs.bin" if pairs else ".bin"
    return Path(root) / "shards" / f"L{seq_len}" / split / f"{unit}{suffix}"
