"""P1: prepare-stage throughput vs the raw tokenizer, worker scaling, and peak memory.

In one run, on the same real text (Linux kernel + Python documentation, >= 20 MB):
  raw      HF `tokenizers` encode_batch_fast over all documents held in memory, one thread:
           the limit for any pipeline built on that tokenizer
  prepare  `python -m pipeline prepare` (read, decode, split, tokenize, pack 2 lengths, write,
           hash) with 1 and with 2 worker processes, timed end to end
  memory   peak RSS of prepare on half of the corpus and on all of it
Writes bench/results/prepare.md and .json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO / ".cache" / "corpora"
OUT = REPO / "bench" / "results"


def corpus_files() -> list[str]:
    files = sorted(str(p) for p in (CORPORA / "linuxdoc").rglob("*.rst.gz"))
    files += sorted(str(p) for p in (CORPORA / "pydoc").rglob("*.rst.txt"))
    if not files:
        sys.exit("bench: run `bash launch/fetch_corpora.sh .cache/corpora pydoc linuxdoc` first")
    return files


def raw_tokenizer(files: list[str]) -> dict:
    from tokenizers import BertWordPieceTokenizer

    from pipeline.config import SourceConfig
    from pipeline.data.sources import WorkUnit, iter_unit_docs
    from pipeline.data.tokenizer import bundled_vocab

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: compare per core
    source = SourceConfig(kind="text", paths=files, doc_split="file")
    docs = list(iter_unit_docs(WorkUnit(0, 0, tuple(files)), source, 100_000, Counter()))
    tok = BertWordPieceTokenizer(str(bundled_vocab()), lowercase=True)._tokenizer
    start = time.perf_counter()
    tokens = sum(len(e.ids) for e in tok.encode_batch_fast(docs, add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {"docs": len(docs), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "mb": sum(len(d.encode()) for d in docs) / 1e6}


def run_prepare(files: list[str], workers: int, tmp: Path, name: str) -> dict:
    cfg = {"run": {"name": name, "root": str(tmp)},
           "data": {"sources": [{"kind": "text", "paths": files, "doc_split": "file"}],
                    "tokenizer": {"kind": "bert-base-uncased"}, "seq_lengths": [128, 512],
                    "validation_fraction": 0.01, "unit_mb": 1, "workers": workers}}
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    code = ("import resource, sys; import pipeline.__main__ as m;"
            "rc = m.main(['prepare', '--config', sys.argv[1]]);"
            "print('MAXRSS', max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(config)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    stage = tmp / name / "prepare"
    record = json.loads((stage / "stage.json").read_text())
    busy = sum(json.loads(p.read_text())["seconds"] for p in (stage / "units").glob("*.json"))
    rss_kb = int(proc.stdout.split("MAXRSS")[-1].split()[0])
    tokens = record["metrics"]["tokens"]
    return {"workers": workers, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "worker_seconds": busy, "tokens_per_worker_s": tokens / busy,
            "steady_tokens_per_s": record["metrics"]["tokens_per_s"],
            "peak_rss_mb": rss_kb / 1024, "files": len(files)}


def main() -> None:
    files = corpus_files()
    raw = raw_tokenizer(files)
    with tempfile.TemporaryDirectory() as tmp:
        one = run_prepare(files, 1, Path(tmp), "w1")
        two = run_prepare(files, 2, Path(tmp), "w2")
        half = run_prepare(files[: len(files) // 2], 1, Path(tmp), "half")
    result = {
        "corpus_mb": raw["mb"], "docs": raw["docs"], "raw": raw, "prepare_1": one, "prepare_2": two, "half": half,
        "ratio_1_worker_vs_raw": one["tokens_per_s"] / raw["tokens_per_s"],
        "ratio_per_worker_second_vs_raw": one["tokens_per_worker_s"] / raw["tokens_per_s"],
        "scaling_2_workers": two["steady_tokens_per_s"] / (2 * one["steady_tokens_per_s"]),
        "scaling_2_workers_end_to_end": two["tokens_per_s"] / (2 * one["tokens_per_s"]),
        "rss_full_over_half": one["peak_rss_mb"] / half["peak_rss_mb"],
        "cpus": os.cpu_count(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prepare.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join([
        f"Corpus: {raw['mb']:.1f} MB of real text ({raw['docs']:,} documents, {raw['tokens']:,} tokens), "
        f"{os.cpu_count()} cores. Prepare writes seq 128 and 512 shards; times are end to end.",
        "",
        "| what | tokens/s | ratio | peak RSS |",
        "|---|---:|---:|---:|",
        f"| raw `tokenizers` encode_batch_fast, 1 thread (the limit) | {raw['tokens_per_s']:,.0f} | 1.00 | |",
        f"| prepare, 1 worker, per second of unit work | {one['tokens_per_worker_s']:,.0f} "
        f"| {result['ratio_per_worker_second_vs_raw']:.2f} of raw | |",
        f"| prepare, 1 worker, end to end (start-up included) | {one['tokens_per_s']:,.0f} "
        f"| {result['ratio_1_worker_vs_raw']:.2f} of raw | {one['peak_rss_mb']:.0f} MB |",
        f"| prepare, 1 worker, stage wall time after start-up | {one['steady_tokens_per_s']:,.0f} | | |",
        f"| prepare, 2 workers, stage wall time after start-up | {two['steady_tokens_per_s']:,.0f} "
        f"| {result['scaling_2_workers']:.2f} scaling | |",
        f"| prepare, 2 workers, end to end | {two['tokens_per_s']:,.0f} "
        f"| {result['scaling_2_workers_end_to_end']:.2f} scaling | {two['peak_rss_mb']:.0f} MB |",
        f"| prepare, 1 worker, half the corpus | {half['tokens_per_s']:,.0f} | | {half['peak_rss_mb']:.0f} MB "
        f"(full/half {result['rss_full_over_half']:.2f}) |",
    ])
    (OUT / "prepare.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
