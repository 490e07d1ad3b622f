"""Shards checked against the prepare manifest's sha256 before training reads them.

A shard changed on disk (a quota truncation, a bad copy, a flipped sector) would otherwise train
on garbage with no warning. Hashing runs on a thread pool (hashlib releases the GIL on large
buffers, so threads read and hash in parallel) and its verdict is cached per file in
`prepare/verified.json`, keyed by size and modification time: a resumed job re-hashes only files
that changed. Cost: one read of the shards at disk speed the first time a stage uses them.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.data.loader import MANIFEST, read_manifest
from pipeline.errors import StageInputError
from pipeline.rundir import atomic_write_json, sha256_file

CACHE = "verified.json"


def verify_shards(prepare_dir: Path, seq_lens: list[int], log) -> dict:
    """Raise the one line naming the first shard that does not match; return what was checked."""
    prepare_dir = Path(prepare_dir)
    manifest = read_manifest(prepare_dir)
    entries = [entry for seq in seq_lens for split in manifest["shards"].get(f"L{seq}", {}).values()
               for entry in split]
    cache_path = prepare_dir / CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    started, todo, total = time.perf_counter(), [], 0
    for entry in entries:
        for rel, want in _files(entry):
            path = prepare_dir / rel
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise StageInputError(f"{path}: missing (listed in {prepare_dir / MANIFEST})") from None
            key, total = [stat.st_size, stat.st_mtime_ns, want], total + 1
            if cache.get(rel) != key:
                todo.append((rel, path, key))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: sha256_file(item[1]), todo))
    for (rel, path, key), digest in zip(todo, digests):
        if digest != key[2]:
            raise StageInputError(f"{path}: contents do not match the sha256 in {prepare_dir / MANIFEST} "
                                  "(changed or damaged since prepare); rerun `python -m pipeline prepare --force`")
        cache[rel] = key
    if todo:
        atomic_write_json(cache_path, cache)
    checked = {"hashed": len(todo), "cached": total - len(todo), "bytes": sum(k[0] for _, _, k in todo),
               "seconds": time.perf_counter() - started}
    if todo:
        log.info(f"verified {len(todo)} shard files ({checked['bytes'] / 1e6:,.1f} MB) against the manifest "
                 f"in {checked['seconds']:.1f} s")
    return checked


def _files(entry: dict) -> list[tuple[str, str]]:
    files = [(entry["path"], entry["sha256"])]
    if "pairs_path" in entry and "pairs_sha256" in entry:
        files.append((entry["pairs_path"], entry["pairs_sha256"]))
    return files
