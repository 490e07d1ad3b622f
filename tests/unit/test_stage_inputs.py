"""Which upstream records make a stage stale."""

from __future__ import annotations

import json

from pipeline.config import RunConfig
from pipeline.rundir import RunDir, StageRecord
from pipeline.runner import check_inputs
from pipeline.stages import stage_specs


def _complete(run_dir: RunDir, stage: str, **metrics) -> None:
    out = run_dir.stage_dir(stage)
    out.mkdir(parents=True, exist_ok=True)
    (out / "out.json").write_text(json.dumps({"plan": "same", **metrics}))  # search: masks.json's info
    run_dir.write_record(StageRecord(stage=stage, status="complete", config_hash="h", started_at="t",
                                     metrics=metrics, outputs=run_dir.describe_output(stage, [out / "out.json"])))


def test_a_rerun_search_makes_retrain_stale_when_retrain_reads_its_record(tmp_path):
    """retrain with continue_search reads the search's trained steps from its stage record: a search rerun
    with another seed changes that record, and the same ticket (so the same prune output) must not hide it."""
    cfg = RunConfig.model_validate({"run": {"name": "r", "root": str(tmp_path)},
                                    "retrain": {"rewind": "search_end", "continue_search": True}})
    run_dir = RunDir(tmp_path, "r")
    for stage in ("prepare", "prune"):
        _complete(run_dir, stage)
    _complete(run_dir, "search", trained_steps=40)
    spec = stage_specs()["retrain"]
    before = {k: v.fingerprint() for k, v in check_inputs(spec, cfg, run_dir).items()}
    _complete(run_dir, "search", trained_steps=60)  # the same ticket, drawn 20 steps later
    after = {k: v.fingerprint() for k, v in check_inputs(spec, cfg, run_dir).items()}
    assert before != after and before["prune"] == after["prune"]
    plain = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"continue_search": False,
                                                                              "rewind": "search_start"})})
    assert "search" not in spec.needs(plain)  # it reads only prune's model then
