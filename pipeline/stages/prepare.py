"""prepare: raw text -> tokenizer + fixed-length token shards + manifest.

  1. check every input before any work (missing paths, unreadable dumps, bad vocab);
  2. plan work units from the inputs alone (same plan on every rank, whatever the rank count);
  3. rank 0 builds the tokenizer (trains one if asked), the others wait for it;
  4. each rank takes units index % world == rank, runs them in a local process pool, and
     skips units already done by an earlier, interrupted run of the same config;
  5. after a barrier rank 0 writes the manifest from the units' records, in unit order.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.table import Table

from pipeline.config import RunConfig
from pipeline.console import print_table, progress
from pipeline.data.hf import parquet_files, plan_dataset_units
from pipeline.data.shards import FORMAT_VERSION, MANIFEST
from pipeline.data.sources import WorkUnit, expand_paths, iter_unit_docs, plan_file_units
from pipeline.data.tokenizer import build_tokenizer, pretrained_vocab, tokenizer_info
from pipeline.data.units import UnitJob, process_unit, unit_done
from pipeline.errors import ConfigError, StageInputError
from pipeline.rundir import atomic_write_json, sha256_json
from pipeline.runner import StageContext, StageResult


def input_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """What the raw inputs are, cheaply (path, size, mtime): a changed corpus reruns the stage."""
    digest = hashlib.sha256()
    for index, source in enumerate(cfg.data.sources):
        if source.kind == "hf_disk":
            paths = _dataset_files(source.paths[0])
        else:
            paths = parquet_files(source, index) if source.kind == "parquet" else expand_paths(source, index)
        for path in paths:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if cfg.data.tokenizer.kind == "pretrained":  # the vocab comes from outside the data section
        vocab = Path(cfg.pretrain.init_from) / "vocab.txt"
        st = os.stat(vocab) if vocab.exists() else None
        digest.update(f"{vocab}\0{st and st.st_size}\0{st and st.st_mtime_ns}\n".encode())
    return {"corpus": digest.hexdigest()}


def _dataset_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    return sorted(str(p) for p in Path(path).rglob("*") if p.is_file())


def plan_units(cfg: RunConfig) -> list[WorkUnit]:
    from pipeline.data.wiki import check_wiki_dump

    unit_bytes = int(cfg.data.unit_mb * (1 << 20))
    units: list[WorkUnit] = []
    for index, source in enumerate(cfg.data.sources):
        if source.kind in ("hf_disk", "parquet"):
            units += plan_dataset_units(source, index, unit_bytes, len(units))
            continue
        files = expand_paths(source, index)
        if source.kind == "wiki_xml":
            for path in files:
                try:
                    check_wiki_dump(path)
                except ValueError as exc:
                    raise StageInputError(f"data.sources.{index}.paths: {exc}") from None
        units += plan_file_units(files, index, unit_bytes, len(units))
    return units


def run(ctx: StageContext) -> StageResult:
    cfg, dist, out = ctx.cfg, ctx.dist, ctx.stage_dir
    if not cfg.data.sources:
        raise ConfigError("data.sources: the prepare stage needs at least one source")
    units = dist.broadcast_object(_checked_plan(cfg) if dist.is_main else None)
    tok_dir = out / "tokenizer"
    if dist.is_main:
        _ensure_tokenizer(ctx, units)
    dist.barrier()
    info = tokenizer_info(tok_dir)
    config_hash = cfg.section_hash(("data",))
    jobs = [UnitJob(u, cfg.data, str(out), str(tok_dir), config_hash, cfg.run.seed) for u in units]
    mine = [job for job in jobs if job.unit.index % dist.world_size == dist.rank]
    started = time.perf_counter()
    records, reused = _run_jobs(ctx, mine)
    my_report = {"rank": dist.rank, "units": len(records), "reused": reused,
                 "seconds": time.perf_counter() - started,
                 "stats": sum((Counter(r["stats"]) for r in records[reused:]), Counter())}
    reports = dist.all_gather_object(my_report)
    dist.barrier()
    outputs = [out / MANIFEST] + sorted(p for p in tok_dir.iterdir() if p.is_file())
    if not dist.is_main:
        return StageResult(outputs=outputs)
    manifest = _write_manifest(ctx, jobs, info, config_hash)
    _print_report(ctx, reports, manifest)
    metrics = _metrics(manifest)
    busiest = max(rep["seconds"] for rep in reports)  # the slowest rank sets the wall time
    processed = sum(_tokens(rep["stats"]) for rep in reports)
    metrics.update(seconds=round(busiest, 3), tokens_per_s=round(processed / max(busiest, 1e-9), 1))
    return StageResult(outputs=outputs, metrics=metrics)


def _tokens(stats: dict) -> int:
    return stats.get("tokens_train", 0) + stats.get("tokens_valid", 0)


def _checked_plan(cfg: RunConfig) -> list[WorkUnit]:
    units = plan_units(cfg)
    if not units:
        raise StageInputError("data.sources: the inputs hold no data")
    return units


def _ensure_tokenizer(ctx: StageContext, units: list[WorkUnit]) -> None:
    """Build once; an interrupted run of the same config reuses the finished tokenizer."""
    tok_dir = ctx.stage_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer_config.json").is_file():
        return
    data = ctx.cfg.data
    corpus = None
    if data.tokenizer.kind == "train":
        ctx.log.info(f"training a {data.tokenizer.vocab_size}-token WordPiece vocab on the corpus")
        corpus = (doc for u in units for doc in iter_unit_docs(u, data.sources[u.source], data.max_line_chars,
                                                               Counter()))
    tmp = ctx.stage_dir / "tokenizer.tmp"
    rules = data.tokenizer
    if rules.kind == "pretrained":
        rules = pretrained_vocab(rules, ctx.cfg.pretrain.init_from)
    info = build_tokenizer(rules, tmp, corpus)
    os.replace(tmp, tok_dir)
    ctx.log.info(f"tokenizer: {info.vocab_size} tokens, sha256 {info.sha256[:12]}")


def _run_jobs(ctx: StageContext, jobs: list[UnitJob]) -> tuple[list[dict], int]:
    todo = [job for job in jobs if unit_done(job) is None]
    records = [unit_done(job) for job in jobs if job not in todo]
    reused = len(records)
    if reused:
        ctx.log.info(f"{reused} unit(s) already done by an earlier run, reused")
    workers = ctx.cfg.data.workers or max(1, (os.cpu_count() or 1) // ctx.dist.env.local_world_size)
    with progress(ctx.dist.rank) as bar:
        task = bar.add_task("prepare", total=len(jobs), completed=reused)
        if workers == 1 or len(todo) <= 1:
            for job in todo:
                records.append(process_unit(job))
                bar.advance(task)
        else:
            # spawn, not fork: the parent may hold threads (progress display, torch) that fork would copy
            pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"))
            with pool:
                for record in pool.map(process_unit, todo):
                    records.append(record)
                    bar.advance(task)
    return records, reused


def _write_manifest(ctx: StageContext, jobs: list[UnitJob], info, config_hash: str) -> dict:
    shards: dict[str, dict[str, list]] = {}
    totals: Counter = Counter()
    for job in jobs:  # unit order, not completion order: the manifest is the same whatever ran where
        record = unit_done(job)
        if record is None:
            raise RuntimeError(f"unit {job.unit.name} has no record after all ranks finished")
        totals.update(record["stats"])
        for key, entry in record["files"].items():
            if key.endswith("/pairs"):
                continue
            length, split = key.split("/")
            pairs = record["files"].get(f"{key}/pairs")
            shards.setdefault(length, {}).setdefault(split, []).append(
                {"path": entry["path"], "rows": entry["rows"], "bytes": entry["bytes"], "sha256": entry["sha256"],
                 **({"pairs_path": pairs["path"], "pairs_sha256": pairs["sha256"]} if pairs else {})})
    manifest = {
        "format_version": FORMAT_VERSION, "config_hash": config_hash, "objective": ctx.cfg.data.objective,
        "seq_lengths": ctx.cfg.data.seq_lengths, "tokenizer": {**info.__dict__, "dtype": info.token_dtype},
        "units": len(jobs), "shards": shards, "stats": dict(sorted(totals.items())),
    }
    manifest["sha256"] = sha256_json(manifest)
    atomic_write_json(ctx.stage_dir / MANIFEST, manifest)
    return manifest


def _metrics(manifest: dict) -> dict:
    stats = manifest["stats"]
    metrics = {"docs": stats.get("docs_train", 0) + stats.get("docs_valid", 0),
               "tokens": stats.get("tokens_train", 0) + stats.get("tokens_valid", 0)}
    for length, splits in manifest["shards"].items():
        for split, files in splits.items():
            metrics[f"sequences_{length}_{split}"] = sum(f["rows"] for f in files)
    metrics["skipped"] = sum(v for k, v in stats.items() if not k.startswith(("docs_", "tokens_")))
    return metrics


def _print_report(ctx: StageContext, reports: list[dict], manifest: dict) -> None:
    table = Table(title=f"prepare: {manifest['units']} units, vocab {manifest['tokenizer']['vocab_size']}")
    for column in ("rank", "units run", "units reused", "docs", "tokens", "seconds", "tokens/s"):
        table.add_column(column, justify="right")
    for rep in reports:
        stats = rep["stats"]
        tokens = _tokens(stats)
        docs = stats.get("docs_train", 0) + stats.get("docs_valid", 0)
        table.add_row(str(rep["rank"]), str(rep["units"] - rep["reused"]), str(rep["reused"]), f"{docs:,}",
                      f"{tokens:,}", f"{rep['seconds']:.1f}", f"{tokens / max(rep['seconds'], 1e-9):,.0f}")
    print_table(ctx.dist.rank, table)
    seqs = Table(title="sequences and skipped input")
    seqs.add_column("what")
    seqs.add_column("count", justify="right")
    for key, value in _metrics(manifest).items():
        seqs.add_row(key, f"{value:,}")
    for key, value in manifest["stats"].items():
        if not key.startswith(("docs_", "tokens_")) and key != "docs_read":
            seqs.add_row(f"skipped: {key}", f"{value:,}")
    print_table(ctx.dist.rank, seqs)
