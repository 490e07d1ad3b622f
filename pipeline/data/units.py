"""One work unit of the prepare stage: read its documents, tokenize, split, pack, write shards.

Runs in a worker process. Its output depends only on the unit, the config and the
tokenizer, so any rank may do it, and redoing it after a crash gives the same bytes. The
unit's JSON record is written last (atomically): present means done, absent means redo.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.packing import PairPacker, StreamPacker, is_validation, split_sentences
from pipeline.data.shards import ShardWriter, shard_path
from pipeline.data.sources import WorkUnit, iter_unit_docs
from pipeline.data.tokenizer import load_tokenizer, tokenizer_info
from pipeline.rundir import atomic_write_json

ENCODE_BATCH = 256
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class UnitJob:
    unit: WorkUnit
    data: DataConfig
    out_dir: str  # the prepare stage directory
    tokenizer_dir: str
    config_hash: str
    seed: int

    @property
    def record_path(self) -> Path:
        return Path(self.out_dir) / "units" / f"{self.unit.name}.json"


def unit_done(job: UnitJob) -> dict | None:
    """The unit's record if it was finished by the same config, else None (redo it)."""
    try:
        record = json.loads(job.record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("config_hash") != job.config_hash:
        return None
    for info in record["files"].values():
        path = Path(job.out_dir) / info["path"]
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return None
    return record


def process_unit(job: UnitJob) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the pool is the parallelism
    started = time.perf_counter()
    data = job.data
    tokenizer = load_tokenizer(Path(job.tokenizer_dir))
    info = tokenizer_info(Path(job.tokenizer_dir))
    dtype = np.dtype(info.token_dtype)
    source = data.sources[job.unit.source]
    stats: Counter = Counter()
    pairs = data.objective != "mlm"
    writers = {(L, s): ShardWriter(shard_path(job.out_dir, L, s, job.unit.name)) for L in data.seq_lengths
               for s in SPLITS}
    aux = {k: ShardWriter(shard_path(job.out_dir, k[0], k[1], job.unit.name, pairs=True)) for k in writers} \
        if pairs else {}
    unit_seed = job.seed * 1_000_003 + job.unit.index  # pair sampling differs per unit, fixed per run
    packers = {(L, s): (PairPacker(L, info, dtype, data.objective, unit_seed) if pairs
                        else StreamPacker(L, info, dtype)) for (L, s) in writers}
    docs = iter_unit_docs(job.unit, source, data.max_line_chars, stats)
    while batch := list(itertools.islice(docs, ENCODE_BATCH)):
        splits = ["valid" if is_validation(d, data.validation_fraction) else "train" for d in batch]
        if pairs:
            _pack_pairs(tokenizer, batch, splits, packers, writers, aux, stats)
        else:
            encoded = tokenizer.encode_batch_fast(batch, add_special_tokens=False)
            for enc, split in zip(encoded, splits):
                stats[f"tokens_{split}"] += len(enc.ids)
                stats[f"docs_{split}"] += 1
                for L in data.seq_lengths:
                    _write(writers[(L, split)], packers[(L, split)].add(enc.ids))
    if not pairs:
        for key, packer in packers.items():
            _write(writers[key], packer.flush())
    return _finish(job, writers, aux, stats, time.perf_counter() - started)


def _pack_pairs(tokenizer, batch, splits, packers, writers, aux, stats) -> None:
    for doc, split in zip(batch, splits):
        sentences = [e.ids for e in tokenizer.encode_batch_fast(split_sentences(doc), add_special_tokens=False)]
        stats[f"tokens_{split}"] += sum(map(len, sentences))
        stats[f"docs_{split}"] += 1
        for (L, s), packer in packers.items():
            if s == split and (made := packer.add_document(sentences)) is not None:
                writers[(L, s)].write(made[0])
                aux[(L, s)].write(made[1])


def _write(writer: ShardWriter, rows: np.ndarray | None) -> None:
    if rows is not None:
        writer.write(rows)


def _finish(job: UnitJob, writers: dict, aux: dict, stats: Counter, seconds: float) -> dict:
    files = {}
    for (L, split), writer in writers.items():
        done = writer.close()
        files[f"L{L}/{split}"] = {**done, "path": writer.path.relative_to(job.out_dir).as_posix()}
    for (L, split), writer in aux.items():
        done = writer.close()
        files[f"L{L}/{split}/pairs"] = {**done, "path": writer.path.relative_to(job.out_dir).as_posix()}
    record = {"unit": job.unit.name, "config_hash": job.config_hash, "files": files, "stats": dict(stats),
              "seconds": round(seconds, 3)}
    atomic_write_json(job.record_path, record)
    return record
