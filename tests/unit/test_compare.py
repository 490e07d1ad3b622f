"""The dense-vs-ticket comparison, from stage records written by hand."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.tasks.compare import comparison_rows, pretraining_cost, render


def _record(run: Path, stage: str, start: str, end: str, **metrics) -> None:
    (run / stage).mkdir(parents=True)
    (run / stage / "stage.json").write_text(json.dumps({
        "stage": stage, "status": "complete", "started_at": f"2026-01-01T{start}+00:00",
        "ended_at": f"2026-01-01T{end}+00:00", "metrics": metrics}))


def _result(model: str, variant: str, value: float, params: int) -> dict:
    return {"task": "rt", "kind": "classification", "model": model, "variant": variant, "parameters": params,
            "metrics": {"accuracy": value}, "seconds": 30.0, "flops": 1e12}


def test_ticket_cost_is_search_prune_and_retrain_against_dense_pretrain(tmp_path):
    _record(tmp_path, "pretrain", "10:00:00", "10:10:00", phase0_flops=6e14, phase1_flops=4e14)
    _record(tmp_path, "search", "11:00:00", "11:01:00", trained_flops=1e14)
    _record(tmp_path, "prune", "11:01:00", "11:01:30")
    _record(tmp_path, "retrain", "11:02:00", "11:07:30", phase0_flops=3e14, phase1_flops=1e14)
    assert pretraining_cost(tmp_path, "pretrain") == {"stages": "pretrain", "seconds": 600.0, "flops": 1e15}
    ticket = pretraining_cost(tmp_path, "retrain")
    assert ticket["seconds"] == 60 + 30 + 330 and ticket["flops"] == 5e14
    assert pretraining_cost(tmp_path, "/some/hf/dir") is None
    results = [_result("pretrain", "standard", 0.8, 5_000_000), _result("retrain", "standard", 0.79, 4_000_000)]
    rows = comparison_rows(results, tmp_path)
    dense, pruned = rows
    assert dense["pretraining_saving"] == 0.0 and abs(pruned["pretraining_saving"] - 0.3) < 1e-9
    assert abs(pruned["pretraining_flops_saving"] - 0.5) < 1e-9
    _, markdown = render(rows, ["rt"], "demo")
    lines = markdown.splitlines()
    assert lines[0].startswith("| model | fine-tuning | params |") and "rt accuracy" in lines[0]
    assert lines[3] == ("| retrain (EarlyBERT ticket) | standard | 4.00M | 420 s | 500.00 | +30% | +50% | 0.7900 "
                        "| 30 s |")


def test_an_incomplete_stage_has_no_cost(tmp_path):
    _record(tmp_path, "pretrain", "10:00:00", "10:10:00")
    record = json.loads((tmp_path / "pretrain" / "stage.json").read_text())
    (tmp_path / "pretrain" / "stage.json").write_text(json.dumps({**record, "status": "running"}))
    assert pretraining_cost(tmp_path, "pretrain") is None


def test_scratch_costs_no_pretraining_and_claims_no_saving(tmp_path):
    _record(tmp_path, "pretrain", "10:00:00", "10:10:00", phase0_flops=1e15)
    rows = comparison_rows([_result("pretrain", "standard", 0.8, 5_000_000),
                            _result("scratch", "standard", 0.6, 5_000_000)], tmp_path)
    scratch = rows[1]
    assert scratch["pretraining"] == {"stages": "none", "seconds": 0.0, "flops": 0.0}
    assert scratch["pretraining_saving"] is None and scratch["pretraining_flops_saving"] is None
    _, markdown = render(rows, ["rt"], "demo")
    row = markdown.splitlines()[3]
    assert row.startswith("| scratch (random init, control) | standard | 5.00M | 0 s | 0.00 | - | -")
