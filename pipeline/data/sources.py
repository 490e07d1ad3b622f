"""Corpus readers: files and datasets in, documents (str) out, one work unit at a time.

A work unit is a run of consecutive files (or dataset rows) of about `unit_mb` of input, in a
fixed order derived from the inputs alone. Units, not ranks, are the grain of both
parallelism and resume, which is why the output cannot depend on how many ranks ran.
Readers stream: memory depends on the longest line and the batch size, never on the corpus.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import SourceConfig
from pipeline.errors import StageInputError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".tex", "")  # in directories; globs take anything
COMPRESSED = (".gz", ".bz2", ".zst")
SNIFF_BYTES = 8192


@dataclass(frozen=True)
class WorkUnit:
    index: int
    source: int  # index into the data config's sources
    files: tuple[str, ...] = ()
    rows: tuple[int, int] | None = None  # [start, stop) for datasets

    @property
    def name(self) -> str:
        return f"u{self.index:06d}"


def expand_paths(source: SourceConfig, source_index: int) -> list[str]:
    """Every file a source names, sorted; a path or glob that names nothing is an error."""
    found: list[str] = []
    for pattern in source.paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        files = []
        for match in matches:
            if os.path.isdir(match):
                files += _files_under(match)
            elif os.path.isfile(match):
                files.append(match)
        if not files:
            raise StageInputError(f"data.sources.{source_index}.paths: '{pattern}' matches no file")
        found += files
    return sorted(dict.fromkeys(found))


def _files_under(directory: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            base = _strip_compression(name)
            if not name.startswith(".") and Path(base).suffix.lower() in TEXT_SUFFIXES + (".jsonl", ".json",
                                                                                          ".xml"):
                out.append(os.path.join(root, name))
    return out


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def plan_file_units(files: list[str], source_index: int, unit_bytes: int, first_index: int) -> list[WorkUnit]:
    """Group consecutive files into units of about `unit_bytes` (a big file is a unit alone)."""
    units: list[WorkUnit] = []
    batch: list[str] = []
    size = 0
    for path in files:
        nbytes = os.path.getsize(path)
        if batch and size + nbytes > unit_bytes:
            units.append(WorkUnit(first_index + len(units), source_index, tuple(batch)))
            batch, size = [], 0
        batch.append(path)
        size += nbytes
    if batch:
        units.append(WorkUnit(first_index + len(units), source_index, tuple(batch)))
    return units


def open_binary(path: str) -> io.BufferedIOBase:
    """Open plain or compressed files as a byte stream (decompressing on the fly)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def iter_lines(path: str, max_chars: int, stats: Counter) -> Iterator[str]:
    """Decoded lines without their newline; bad bytes are replaced, overlong lines skipped."""
    try:
        with open_binary(path) as handle:
            head = handle.peek(SNIFF_BYTES)[:SNIFF_BYTES] if hasattr(handle, "peek") else b""
            if b"\x00" in head:
                stats["binary_file"] += 1
                return
            yield from _decoded_lines(handle, max_chars, stats)
    except (EOFError, OSError):  # truncated or corrupt compressed stream: keep what was read
        stats["truncated_file"] += 1


def _decoded_lines(handle: io.BufferedIOBase, max_chars: int, stats: Counter) -> Iterator[str]:
    # UTF-8 needs at most 4 bytes a character, so this byte cap never cuts a legal line
    cap = 4 * max_chars + 2
    while raw := handle.readline(cap):
        if len(raw) == cap and not raw.endswith(b"\n"):
            stats["long_line"] += 1
            while (rest := handle.readline(cap)) and not rest.endswith(b"\n"):
                pass  # discard the rest of the line without holding it
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["invalid_utf8_line"] += 1
            line = raw.decode("utf-8", errors="replace")
        line = line.rstrip("\r\n")
        if len(line) > max_chars:
            stats["long_line"] += 1
            continue
        yield line


def iter_text_docs(path: str, doc_split: str, max_chars: int, stats: Counter) -> Iterator[str]:
    if os.path.getsize(path) == 0:
        stats["empty_file"] += 1
        return
    if doc_split == "line":
        yield from (line.strip() for line in iter_lines(path, max_chars, stats) if line.strip())
        return
    paragraph: list[str] = []
    for line in iter_lines(path, max_chars, stats):
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph and doc_split == "blank_line":
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def iter_jsonl_docs(path: str, field: str, max_chars: int, stats: Counter) -> Iterator[str]:
    if os.path.getsize(path) == 0:
        stats["empty_file"] += 1
        return
    for line in iter_lines(path, max_chars, stats):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats["bad_json"] += 1
            continue
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats["missing_field"] += 1
            continue
        yield text


def iter_unit_docs(unit: WorkUnit, source: SourceConfig, max_chars: int, stats: Counter) -> Iterator[str]:
    """All documents of one work unit, in a fixed order; empty documents are counted, not yielded."""
    for doc in _raw_unit_docs(unit, source, max_chars, stats):
        doc = doc.strip()
        if doc:
            stats["docs_read"] += 1
            yield doc
        else:
            stats["empty_doc"] += 1


def _raw_unit_docs(unit: WorkUnit, source: SourceConfig, max_chars: int, stats: Counter) -> Iterator[str]:
    if source.kind in ("hf_disk", "parquet"):
        from pipeline.data.hf import iter_dataset_rows

        yield from iter_dataset_rows(source, unit.source, unit.rows, stats)
        return
    for path in unit.files:
        if source.kind == "text":
            yield from iter_text_docs(path, source.doc_split, max_chars, stats)
        elif source.kind == "jsonl":
            yield from iter_jsonl_docs(path, source.text_field, max_chars, stats)
        else:
            yield from _wiki_docs(path, stats)


def _wiki_docs(path: str, stats: Counter) -> Iterator[str]:
    from pipeline.data.wiki import iter_wiki_articles

    try:
        yield from iter_wiki_articles(path, stats)
    except ValueError:  # damage past the header (checked up front): keep the pages before it
        stats["truncated_file"] += 1
