"""`python -m pipeline report --config FILE`: rebuild the run's page from its directory."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from pipeline.errors import StageInputError
from pipeline.rundir import RunDir


def run_report(config_path: str, overrides: list[str]) -> int:
    cfg = load_config(config_path, overrides)
    path = write_report(cfg)
    print(f"report: {path}")
    return 0


def write_report(cfg) -> Path:
    run_dir = RunDir(cfg.run.root, cfg.run.name).path
    if not run_dir.is_dir():
        raise StageInputError(f"{run_dir}: no such run directory (run a stage of {cfg.run.name} first)")
    from pipeline.report.page import build_report  # matplotlib and numpy only when a report is made

    return build_report(run_dir, cfg.search)
