"""Runs one stage: check its inputs, skip it when nothing changed, record it in `stage.json`.

The lifecycle, identical on every rank:
  1. every upstream stage this one reads must be complete, or we stop with its name;
  2. a complete record with the same config hash, the same input hashes and all outputs
     present means the stage is skipped (`force` reruns it);
  3. rank 0 marks the stage `running`, everybody runs it, rank 0 marks it `complete`
     only after all ranks returned and the outputs were hashed.
A stage killed at any point is left `running` (or `failed`), which is never skipped; its
next run resumes from whatever partial work the stage itself knows how to reuse.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.console import get_logger
from pipeline.dist import Dist, lost_peer
from pipeline.errors import PipelineError, RankLost, StageInputError, Stopped
from pipeline.fingerprint import changed_fields
from pipeline.lock import StageLock
from pipeline.rundir import RunDir, StageRecord, atomic_write_text, host_name, now_iso
from pipeline.stages import StageSpec, stage_specs


@dataclass(frozen=True)
class StageContext:
    cfg: RunConfig
    spec: StageSpec
    run_dir: RunDir
    dist: Dist
    inputs: dict[str, StageRecord]  # upstream stage name -> its complete record
    stop: Any = None  # pipeline.stopping.StopRequests: training loops ask it once per step

    @property
    def stage_dir(self) -> Path:
        return self.run_dir.stage_dir(self.spec.name)

    @property
    def log(self) -> logging.Logger:
        return get_logger(self.spec.name)

    def input_dir(self, stage: str) -> Path:
        return self.run_dir.stage_dir(stage)


@dataclass(frozen=True)
class StageResult:
    outputs: list[Path]  # the files that make the stage complete (absolute or stage-relative)
    metrics: dict[str, Any] = field(default_factory=dict)


def run_stage(name: str, cfg: RunConfig, dist: Dist, force: bool = False, stop: Any = None) -> StageRecord:
    spec = stage_specs()[name]
    run_dir = RunDir(cfg.run.root, cfg.run.name)
    log = get_logger(name)
    inputs = check_inputs(spec, cfg, run_dir)
    if not spec.available():
        raise PipelineError(f"stage '{name}' is not part of this version of the pipeline")
    module = importlib.import_module(spec.module)
    input_hashes = {stage: rec.fingerprint() for stage, rec in inputs.items()}
    external = getattr(module, "input_fingerprints", None)
    if external is not None:  # files outside the run directory, e.g. a raw corpus
        input_hashes.update(external(cfg))
    config_hash = cfg.section_hash(spec.sections)
    settings = Settings(*cfg.settings(spec.sections))
    previous = run_dir.read_record(name)
    if not force and _up_to_date(previous, config_hash, input_hashes, run_dir):
        log.info(f"[bold]{name}[/]: up to date in {run_dir.stage_dir(name)}, skipped (--force reruns it)",
                 extra={"markup": True})
        return previous
    with StageLock(run_dir.stage_dir(name).with_name(f".{name}.lock"), host_name(), log).held(dist):
        dist.barrier()  # every rank has read the old record before rank 0 replaces it
        started = now_iso()
        resumes = not force and previous is not None and (previous.config_hash, previous.inputs) == (
            config_hash, input_hashes)  # the same on every rank: each records the same settings
        settings = settings.carried_from(previous if resumes else None, started, name, log)
        if dist.is_main:
            _prepare_stage_dir(run_dir, name, previous, config_hash, input_hashes, force, settings, log)
            atomic_write_text(run_dir.path / "config.yaml", cfg.to_yaml())
            atomic_write_text(run_dir.stage_dir(name) / "config.yaml", cfg.to_yaml())
            run_dir.write_record(_record(name, "running", config_hash, input_hashes, started, dist, settings))
        dist.barrier()
        ctx = StageContext(cfg, spec, run_dir, dist, inputs, stop)
        try:
            result = module.run(ctx)
            dist.barrier()  # outputs of every rank are on disk
            if dist.is_main:
                record = _record(name, "complete", config_hash, input_hashes, started, dist, settings,
                                 outputs=run_dir.describe_output(name, result.outputs), metrics=result.metrics)
                run_dir.write_record(record)
            dist.barrier()  # nobody moves on (run-all) before the record exists
        except Stopped as exc:  # saved where the stage can resume from; not a failure
            if dist.is_main:
                run_dir.write_record(_record(name, "stopped", config_hash, input_hashes, started, dist, settings,
                                             error=str(exc)))
            raise
        except BaseException as exc:
            lost = lost_peer(exc)
            if lost:  # rank 0 may be the one that died: every survivor records it (the same line, atomically)
                message = f"stage {name}, rank {dist.rank} on {host_name()}: {lost}"
                run_dir.write_record(_record(name, "failed", config_hash, input_hashes, started, dist, settings,
                                             error=message))
                raise RankLost(message) from None
            if dist.is_main:
                run_dir.write_record(_record(name, "failed", config_hash, input_hashes, started, dist, settings,
                                             error=f"{type(exc).__name__}: {exc}"))
            raise
        return run_dir.read_record(name)


def check_inputs(spec: StageSpec, cfg: RunConfig, run_dir: RunDir) -> dict[str, StageRecord]:
    inputs = {}
    for upstream in spec.needs(cfg):
        record = run_dir.read_record(upstream)
        where = run_dir.record_path(upstream)
        if record is None:
            raise StageInputError(f"stage '{spec.name}' needs stage '{upstream}', which has not run "
                                  f"(no {where}); run `python -m pipeline {upstream}` first")
        if record.status != "complete":
            raise StageInputError(f"stage '{spec.name}' needs stage '{upstream}', which is "
                                  f"{record.status} ({where}); rerun `python -m pipeline {upstream}`")
        missing = run_dir.missing_outputs(record)
        if missing:
            raise StageInputError(f"stage '{spec.name}' needs stage '{upstream}', whose output "
                                  f"{run_dir.stage_dir(upstream) / missing[0]} is missing or changed")
        inputs[upstream] = record
    return inputs


def _up_to_date(previous: StageRecord | None, config_hash: str, input_hashes: dict[str, str],
                run_dir: RunDir) -> bool:
    return (previous is not None and previous.status == "complete"
            and previous.config_hash == config_hash and previous.inputs == input_hashes
            and not run_dir.missing_outputs(previous))


@dataclass(frozen=True)
class Settings:
    """A stage's config fields by dotted name, as its record keeps them: those its hash covers, the RUNTIME
    ones, and the RUNTIME changes made on resumes so far."""

    result: dict[str, Any]
    runtime: dict[str, Any]
    changes: tuple[str, ...] = ()

    def carried_from(self, previous: StageRecord | None, when: str, name: str, log: logging.Logger) -> Settings:
        """Resuming `previous`'s work: its RUNTIME changes so far plus the ones made now, each logged."""
        if previous is None:
            return self
        now = changed_fields(previous.runtime, self.runtime) if previous.runtime else []
        if now:
            log.info(f"{name}: resuming with {'; '.join(now)} (how it runs, not what it computes)")
        return Settings(self.result, self.runtime, (*previous.runtime_changes, *(f"{when} {c}" for c in now)))


def _prepare_stage_dir(run_dir: RunDir, name: str, previous: StageRecord | None, config_hash: str,
                       input_hashes: dict[str, str], force: bool, settings: Settings, log: logging.Logger) -> None:
    """Keep partial work only when it was made by the same config from the same inputs.

    Stale work is moved aside rather than deleted: a typo in a config must not cost a week
    of checkpoints. The warning names what changed.
    """
    stage_dir = run_dir.stage_dir(name)
    same = previous is not None and previous.config_hash == config_hash and previous.inputs == input_hashes
    if stage_dir.exists() and previous is not None and (force or not same):
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = stage_dir.with_name(f"{name}.old-{stamp}")
        stage_dir.rename(aside)
        log.warning(f"{name}: {_why_stale(previous, config_hash, input_hashes, force, settings)}; previous output "
                    f"moved to {aside}")
    stage_dir.mkdir(parents=True, exist_ok=True)


def _why_stale(previous: StageRecord, config_hash: str, input_hashes: dict[str, str], force: bool,
               settings: Settings) -> str:
    if force:
        return "--force"
    why = []
    if previous.config_hash != config_hash:
        fields = changed_fields(previous.settings, settings.result) if previous.settings else []
        why.append(f"config changed ({'; '.join(fields)})" if fields else "config changed")
    changed = sorted(k for k in set(previous.inputs) | set(input_hashes)
                     if previous.inputs.get(k) != input_hashes.get(k))
    if changed:
        why.append(f"input{'s' if len(changed) > 1 else ''} {', '.join(changed)} changed")
    return "; ".join(why)


def _record(name: str, status: str, config_hash: str, inputs: dict[str, str], started: str, dist: Dist,
            settings: Settings | None = None, **extra: Any) -> StageRecord:
    ended = now_iso() if status != "running" else None
    if settings is not None:
        extra.update(settings=settings.result, runtime=settings.runtime, runtime_changes=list(settings.changes))
    return StageRecord(stage=name, status=status, config_hash=config_hash, inputs=inputs, started_at=started,
                       ended_at=ended, world_size=dist.world_size, host=host_name(), **extra)
