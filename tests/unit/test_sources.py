"""Every input kind, compressed variants, and bad input counted rather than fatal."""

from __future__ import annotations

import bz2
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from pipeline.config import SourceConfig
from pipeline.data.sources import WorkUnit, expand_paths, iter_unit_docs, plan_file_units
from pipeline.errors import StageInputError

WIKI = Path(__file__).resolve().parents[1] / "fixtures" / "wiki" / "enwiki-excerpt.xml.bz2"
TEXT = "First doc line one.\nline two.\n\nSecond doc.\n\n\nThird doc here.\n"


def _docs(kind: str, files: list[Path], stats: Counter | None = None, **kw) -> list[str]:
    source = SourceConfig(kind=kind, paths=[str(f) for f in files], **kw)
    unit = WorkUnit(0, 0, tuple(str(f) for f in files))
    return list(iter_unit_docs(unit, source, 1000, stats if stats is not None else Counter()))


@pytest.mark.parametrize("opener,suffix", [(open, ""), (gzip.open, ".gz"), (bz2.open, ".bz2"),
                                           (None, ".zst")])
def test_text_blank_line_docs_plain_and_compressed(tmp_path, opener, suffix):
    path = tmp_path / f"c.txt{suffix}"
    blob = TEXT.encode()
    if opener is None:
        path.write_bytes(zstandard.ZstdCompressor().compress(blob))
    else:
        with opener(path, "wb") as handle:
            handle.write(blob)
    assert _docs("text", [path]) == ["First doc line one.\nline two.", "Second doc.", "Third doc here."]


def test_text_doc_split_file_and_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    assert _docs("text", [path], doc_split="file") == [TEXT.strip().replace("\n\n\n", "\n\n")
                                                        .replace("\n\n", "\n")]
    assert len(_docs("text", [path], doc_split="line")) == 4


def test_jsonl_with_bad_lines_counted(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    lines = [json.dumps({"body": "alpha"}), "{not json", json.dumps({"other": 1}), json.dumps({"body": "beta"})]
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    stats = Counter()
    assert _docs("jsonl", [path], stats, text_field="body") == ["alpha", "beta"]
    assert stats["bad_json"] == 1 and stats["missing_field"] == 1


def test_wiki_dump_source():
    stats = Counter()
    docs = _docs("wiki_xml", [WIKI], stats)
    assert len(docs) == 4 and stats["wiki_redirect"] == 1 and all("[[" not in d for d in docs)


def test_hf_dataset_on_disk(tmp_path):
    import datasets

    from pipeline.data.hf import plan_dataset_units

    ds = datasets.Dataset.from_dict({"text": [f"document number {i}" for i in range(50)], "id": list(range(50))})
    ds.save_to_disk(str(tmp_path / "ds"))
    source = SourceConfig(kind="hf_disk", paths=[str(tmp_path / "ds")])
    units = plan_dataset_units(source, 0, unit_bytes=200, first_index=0)
    assert len(units) > 1 and units[0].rows[0] == 0 and units[-1].rows[1] == 50
    docs = [d for u in units for d in iter_unit_docs(u, source, 1000, Counter())]
    assert docs == [f"document number {i}" for i in range(50)]
    bad = SourceConfig(kind="hf_disk", paths=[str(tmp_path / "ds")], text_field="body")
    with pytest.raises(StageInputError, match="'body' is not a column"):
        plan_dataset_units(bad, 0, 200, 0)


def test_parquet_files_through_datasets(tmp_path, bbc_sample):
    """Two parquet files (as the HF hub serves corpora), a directory naming them: every document once, in
    file order, split into row units; a file that is not parquet is one line naming the source."""
    import pandas as pd

    from pipeline.data.hf import plan_dataset_units

    articles = [" ".join(p.read_text(errors="replace").split()) for p in sorted(bbc_sample.rglob("*.txt"))[:30]]
    (tmp_path / "corpus").mkdir()
    for i, part in enumerate((articles[:12], articles[12:])):
        pd.DataFrame({"text": part, "n": range(len(part))}).to_parquet(tmp_path / "corpus" / f"train-{i:05d}.parquet")
    source = SourceConfig(kind="parquet", paths=[str(tmp_path / "corpus")])
    units = plan_dataset_units(source, 0, unit_bytes=20_000, first_index=0)
    assert len(units) > 1 and units[-1].rows[1] == len(articles)
    assert [d for u in units for d in iter_unit_docs(u, source, 10**6, Counter())] == articles
    (tmp_path / "corpus" / "train-00002.parquet").write_text("not parquet")
    with pytest.raises(StageInputError, match=r"^data.sources.0.paths: .*train-00002.parquet: not readable as parquet"):
        plan_dataset_units(source, 0, 20_000, 0)
    with pytest.raises(StageInputError, match="matches no parquet file"):
        plan_dataset_units(SourceConfig(kind="parquet", paths=[str(tmp_path / "nothing")]), 0, 20_000, 0)


def test_bad_input_is_counted_and_skipped(tmp_path):
    (tmp_path / "utf8.txt").write_bytes(b"caf\xe9 au lait\n\ngood text\n")
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x00\x01" * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "long.txt").write_bytes(b"short line\n" + b"x" * 50_000 + b"\nafter\n")
    varied = "".join(f"line {i * 7919 % 10007}\n" for i in range(5000)).encode()
    (tmp_path / "trunc.txt.gz").write_bytes(gzip.compress(varied)[:2000])
    stats = Counter()
    docs = _docs("text", sorted(tmp_path.iterdir()), stats, doc_split="line")
    assert stats["invalid_utf8_line"] == 1 and "caf\ufffd au lait" in docs
    assert stats["binary_file"] == 1 and stats["empty_file"] == 1
    assert stats["long_line"] == 1 and "after" in docs and "short line" in docs
    assert stats["truncated_file"] == 1


def test_missing_paths_are_errors_naming_the_pattern(tmp_path):
    with pytest.raises(StageInputError, match=r"data.sources.1.paths: '.*nope/\*.txt' matches no file"):
        expand_paths(SourceConfig(kind="text", paths=[str(tmp_path / "nope/*.txt")]), 1)


def test_units_group_files_deterministically(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}.txt").write_text("x" * 100)
    files = expand_paths(SourceConfig(kind="text", paths=[str(tmp_path)]), 0)
    units = plan_file_units(files, 0, unit_bytes=250, first_index=3)
    assert [len(u.files) for u in units] == [2, 2, 2, 2, 2] and units[0].name == "u000003"
    assert [f for u in units for f in u.files] == files
