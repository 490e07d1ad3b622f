"""Hugging Face `datasets` as a corpus: a dataset saved with `save_to_disk` (Arrow, memory-mapped)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

from pipeline.config import SourceConfig
from pipeline.data.sources import WorkUnit
from pipeline.errors import StageInputError


def _load(source: SourceConfig, source_index: int = 0):
    import datasets

    path = source.paths[0]
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
                              f"of {path} (columns: {', '.join(ds.column_names)})")
    return ds


def plan_dataset_units(source: SourceConfig, source_index: int, unit_bytes: int,
                       first_index: int) -> list[WorkUnit]:
    ds = _load(source, source_index)
    rows = len(ds)
    nbytes = max(ds.data.nbytes, 1)
    per_unit = max(1, math.ceil(rows * unit_bytes / nbytes))
    return [WorkUnit(first_index + i, source_index, rows=(start, min(start + per_unit, rows)))
            for i, start in enumerate(range(0, rows, per_unit))]


def iter_dataset_rows(source: SourceConfig, rows: tuple[int, int], stats: Counter) -> Iterator[str]:
    ds = _load(source)
    start, stop = rows
    for batch_start in range(start, stop, 1000):
        texts = ds[batch_start:min(batch_start + 1000, stop)][source.text_field]
        for text in texts:
            if isinstance(text, str):
                yield text
            else:
                stats["missing_field"] += 1
