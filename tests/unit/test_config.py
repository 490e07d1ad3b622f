"""Config errors are one line naming the file, the field and the reason, with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import run_cli, write_config

GOOD = {"run": {"name": "t", "root": "runs"},
        "data": {"sources": [{"kind": "text", "paths": ["corpus"]}]}}


def _error_line(capsys, path: Path, *extra: str) -> str:
    code = main(["prepare", "--config", str(path), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_valid_config_loads_with_defaults(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", GOOD))
    assert cfg.run.name == "t" and cfg.data.seq_lengths == [128, 512] and cfg.optimizer.name == "lamb"
    with pytest.raises(ValidationError):
        cfg.run.seed = 3  # frozen: nothing mutates a loaded config


def test_bad_yaml_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: t\n  root: [unclosed\n")
    err = _error_line(capsys, path)
    assert str(path) in err and "invalid YAML" in err and ":4:" in err


def test_unknown_field_suggests_the_right_one(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", {**GOOD, "data": {**GOOD["data"], "seq_length": [128]}})
    err = _error_line(capsys, path)
    assert err == f"error: {path}: data.seq_length: unknown field (did you mean 'seq_lengths'?)"


def test_unknown_section(tmp_path, capsys):
    err = _error_line(capsys, write_config(tmp_path / "c.yaml", {**GOOD, "optimiser": {"lr": 1}}))
    assert "optimiser: unknown field (did you mean 'optimizer'?)" in err


def test_wrong_type_names_field_and_value(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", {**GOOD, "pretrain": {"log_every": "often"}})
    err = _error_line(capsys, path)
    assert f"{path}: pretrain.log_every:" in err and "'often'" in err


def test_out_of_range_value(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", {**GOOD, "data": {**GOOD["data"], "validation_fraction": 0.7}})
    err = _error_line(capsys, path)
    assert "data.validation_fraction: Input should be less than 0.5 (got 0.7)" in err


def test_nested_list_item_error(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", {**GOOD, "data": {"sources": [{"kind": "pdf", "paths": ["x"]}]}})
    assert "data.sources.0.kind:" in _error_line(capsys, path)


def test_missing_required_section(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", {"data": GOOD["data"]})
    assert _error_line(capsys, path) == f"error: {path}: run: required field is missing"


def test_missing_config_file(tmp_path, capsys):
    assert "config file not found" in _error_line(capsys, tmp_path / "nope.yaml")


def test_overrides_are_typed_and_validated(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", GOOD)
    cfg = load_config(path, ["data.seq_lengths=[64, 128]", "run.seed=7", "model.preset=tiny"])
    assert cfg.data.seq_lengths == [64, 128] and cfg.run.seed == 7 and cfg.model.preset == "tiny"
    err = _error_line(capsys, path, "--set", "data.workers=-1")
    assert err.startswith("error: --set data.workers: Input should be greater than or equal to 0")
    assert "unknown field" in _error_line(capsys, path, "--set", "data.wrokers=1")
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(path, ["data.workers"])


def test_overrides_index_lists(tmp_path, capsys):
    phases = [{"seq_len": 128, "steps": 10, "global_batch_size": 8, "micro_batch_size": 4, "lr": 1e-3},
              {"seq_len": 512, "steps": 5, "global_batch_size": 4, "micro_batch_size": 2}]
    path = write_config(tmp_path / "c.yaml", {**GOOD, "pretrain": {"phases": phases}})
    cfg = load_config(path, ["pretrain.phases.0.steps=3", "pretrain.phases.1.warmup=0.5"])
    first, second = cfg.pretrain.phases
    assert (first.steps, first.lr, first.seq_len, second.steps, second.warmup) == (3, 1e-3, 128, 5, 0.5)
    err = _error_line(capsys, path, "--set", "pretrain.phases.2.steps=3")
    assert err == "error: --set pretrain.phases.2.steps=3: 'pretrain.phases' is a list of 2, '2' is not an index in it"
    assert "is not a section" in _error_line(capsys, path, "--set", "run.name.x=1")
    err = _error_line(capsys, path, "--set", "pretrain.phases.0.steps=0")
    assert err.startswith("error: --set pretrain.phases.0.steps: Input should be greater than 0")


def test_base_chain_merges_and_detects_loops(tmp_path):
    write_config(tmp_path / "base.yaml", {**GOOD, "model": {"preset": "small", "dropout": 0.2}})
    child = write_config(tmp_path / "child.yaml", {"base": "base.yaml", "model": {"preset": "tiny"}})
    cfg = load_config(child)
    assert cfg.model.preset == "tiny" and cfg.model.dropout == 0.2 and cfg.run.name == "t"
    write_config(tmp_path / "loop.yaml", {"base": "loop.yaml"})
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_stage_hash_covers_only_its_sections(tmp_path):
    a = load_config(write_config(tmp_path / "a.yaml", GOOD))
    b = load_config(write_config(tmp_path / "b.yaml", {**GOOD, "finetune": {"epochs": 9}}))
    c = load_config(write_config(tmp_path / "c.yaml", {**GOOD, "data": {**GOOD["data"], "workers": 3}}))
    assert a.section_hash(("data",)) == b.section_hash(("data",))
    assert a.section_hash(("finetune",)) != b.section_hash(("finetune",))
    assert a.section_hash(("data",)) != c.section_hash(("data",))


def test_shipped_configs_are_valid():
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_cli_process_exit_code_and_single_line(tmp_path):
    path = write_config(tmp_path / "c.yaml", {**GOOD, "model": {"preset": "huge"}})
    proc = run_cli("prepare", "--config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "model.preset" in proc.stderr
    assert "Traceback" not in proc.stderr


PRETRAIN_SECTIONS = ("data", "model", "optimizer", "schedule", "pretrain", "distributed")


def _base_and_changed(tmp_path, field: str, value) -> tuple:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "x"}, "pretrain": {"phases": [
        {"seq_len": 128, "steps": 10, "global_batch_size": 16, "micro_batch_size": 8}]}}))
    return load_config(path), load_config(path, [f"{field}={value}"])


RUNTIME_CHANGES = {"pretrain.checkpoint_every": 7, "pretrain.eval_every": 3, "pretrain.log_every": 1,
                   "pretrain.peak_tflops": 1.5, "pretrain.compile": True, "pretrain.keep_last": 5,
                   "pretrain.eval_batches": 3, "pretrain.phases.0.micro_batch_size": 4,
                   "distributed.timeout_minutes": 5, "distributed.backend": "gloo"}


@pytest.mark.parametrize("field, value", list(RUNTIME_CHANGES.items()))
def test_how_a_stage_runs_is_not_part_of_its_fingerprint(tmp_path, field, value):
    base, changed = _base_and_changed(tmp_path, field, value)
    assert base.section_hash(PRETRAIN_SECTIONS) == changed.section_hash(PRETRAIN_SECTIONS)
    assert changed.settings(PRETRAIN_SECTIONS)[1][field] == value  # recorded as a RUNTIME field


@pytest.mark.parametrize("field, value", [("optimizer.lr", 0.001), ("model.hidden_size", 64),
                                          ("pretrain.phases.0.global_batch_size", 32), ("run.seed", 7)])
def test_what_a_stage_computes_is_and_the_change_is_named(tmp_path, field, value):
    from pipeline.fingerprint import changed_fields

    base, changed = _base_and_changed(tmp_path, field, value)
    assert base.section_hash(PRETRAIN_SECTIONS) != changed.section_hash(PRETRAIN_SECTIONS)
    named = changed_fields(base.settings(PRETRAIN_SECTIONS)[0], changed.settings(PRETRAIN_SECTIONS)[0])
    assert len(named) == 1 and named[0].startswith(f"{field}: ") and named[0].endswith(f" -> {value}"), named
