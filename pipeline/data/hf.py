"""Hugging Face `datasets` as a corpus: a dataset saved with `save_to_disk` (Arrow, memory-mapped), or
parquet files (the format of public corpora on the HF hub), read through `datasets`' parquet builder,
which converts them once to memory-mapped Arrow in its cache (`HF_DATASETS_CACHE`)."""

from __future__ import annotations

import glob
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import SourceConfig
from pipeline.data.sources import WorkUnit
from pipeline.errors import StageInputError


def parquet_files(source: SourceConfig, source_index: int) -> list[str]:
    """Every parquet file a source names (files, directories searched for *.parquet, globs), sorted."""
    found = []
    for pattern in source.paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        files = [str(f) for m in matches for f in (sorted(Path(m).rglob("*.parquet")) if os.path.isdir(m) else
                                                   [m] if os.path.isfile(m) else [])]
        if not files:
            raise StageInputError(f"data.sources.{source_index}.paths: '{pattern}' matches no parquet file")
        found += files
    return sorted(dict.fromkeys(found))


def _readable_parquet(files: list[str], source_index: int) -> list[str]:
    """The files with rows, after reading each footer: datasets' own errors do not name the file, and it
    fails on a file without rows."""
    import pyarrow.parquet as pq

    keep = []
    for path in files:
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for damaged or foreign files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StageInputError(f"data.sources.{source_index}.paths: {path}: not readable as parquet ({first})") \
                from None
        if rows:
            keep.append(path)
    if not keep:
        raise StageInputError(f"data.sources.{source_index}.paths: no rows in {len(files)} parquet file(s)")
    return keep


def _load(source: SourceConfig, source_index: int = 0):
    import datasets

    datasets.logging.set_verbosity_error()  # no progress bars per unit
    path = source.paths[0]
    if source.kind == "parquet":
        files = _readable_parquet(parquet_files(source, source_index), source_index)
        try:
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        except Exception as exc:  # pyarrow and datasets raise many kinds for a file that is not parquet
            while exc.__cause__ is not None:  # datasets wraps pyarrow's reason, which names the file
                exc = exc.__cause__
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StageInputError(f"data.sources.{source_index}.paths: not readable as parquet: {first}") from None
    else:
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as exc:
            raise StageInputError(f"data.sources.{source_index}.paths: {path}: not a saved dataset ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise StageInputError(f"data.sources.{source_index}.paths: {path}: a DatasetDict without 'train'")
        ds = ds["train"]
    if source.text_field not in ds.column_names:
        raise StageInputError(f"data.sources.{source_index}.text_field: '{source.text_field}' is not a column "
                              f"of {', '.join(source.paths)} (columns: {', '.join(ds.column_names)})")
    return ds


def plan_dataset_units(source: SourceConfig, source_index: int, unit_bytes: int,
                       first_index: int) -> list[WorkUnit]:
    ds = _load(source, source_index)
    rows = len(ds)
    nbytes = max(ds.data.nbytes, 1)
    per_unit = max(1, math.ceil(rows * unit_bytes / nbytes))
    return [WorkUnit(first_index + i, source_index, rows=(start, min(start + per_unit, rows)))
            for i, start in enumerate(range(0, rows, per_unit))]


def iter_dataset_rows(source: SourceConfig, source_index: int, rows: tuple[int, int],
                      stats: Counter) -> Iterator[str]:
    ds = _load(source, source_index)
    start, stop = rows
    for batch_start in range(start, stop, 1000):
        texts = ds[batch_start:min(batch_start + 1000, stop)][source.text_field]
        for text in texts:
            if isinstance(text, str):
                yield text
            else:
                stats["missing_field"] += 1
