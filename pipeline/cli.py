"""What a command does once its arguments are parsed: config, launch env, logging, stages."""

from __future__ import annotations

import os
import sys
import time

from rich.table import Table

from pipeline.config import load_config
from pipeline.console import print_table, setup_logging
from pipeline.dist import Dist, detect
from pipeline.report.provenance import record_command
from pipeline.rundir import RunDir
from pipeline.runner import run_stage
from pipeline.stages import ORDER, stage_specs
from pipeline.stopping import StopRequests


def run_command(command: str, config_path: str, overrides: list[str], force: bool) -> int:
    cfg = load_config(config_path, overrides)
    stop = StopRequests(cfg.run.stop_signals, cfg.run.deadline_at(time.time()))  # before any work starts
    try:
        return _run(command, cfg, force, stop)
    finally:
        stop.close()


def _run(command: str, cfg, force: bool, stop: StopRequests) -> int:
    dist = Dist(detect(os.environ), cfg.distributed.timeout_minutes, cfg.distributed.backend)
    log = setup_logging(dist.rank)
    specs = stage_specs()
    names = [n for n in ORDER if specs[n].available()] if command == "run-all" else [command]
    if command == "run-all" and not cfg.finetune.tasks:
        names.remove("finetune")  # nothing to fine-tune on: the run ends with its pretrained models
    log.info(f"run {cfg.run.name} in {cfg.run.root / cfg.run.name}: {', '.join(names)} "
             f"({dist.world_size} rank{'s' if dist.world_size > 1 else ''}, {dist.env.launcher} launch)")
    if dist.is_main:
        record_command(RunDir(cfg.run.root, cfg.run.name).path, sys.argv, dist.world_size, dist.env.launcher)
    records = [run_stage(name, cfg, dist, force=force, stop=stop) for name in names]
    if command == "run-all":
        table = Table(title=f"run {cfg.run.name}")
        for column in ("stage", "status", "finished", "summary"):
            table.add_column(column)
        for rec in records:
            summary = ", ".join(f"{k}={_short(v)}" for k, v in list(rec.metrics.items())[:6])
            table.add_row(rec.stage, rec.status, (rec.ended_at or "")[:19].replace("T", " "), summary)
        print_table(dist.rank, table)
        if "finetune" in names:  # the run's bottom line comes last
            from pipeline.stages.finetune import comparison_table

            print_table(dist.rank, comparison_table(cfg), min_width=180)
    dist.shutdown()
    if command == "run-all" and dist.is_main:  # the page to open comes last (one process draws it)
        from pipeline.report.command import write_report

        log.info(f"report: {write_report(cfg)}")
    return 0


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
