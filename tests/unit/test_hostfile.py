"""Hostfiles and run configs: every malformed input is one line and exit 2, never a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.hostfile import read_hostfile
from tests.conftest import REPO, run_cli

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize(("text", "reason"), [
    ("", "names no host"),
    ("# node01 slots=4\n\n   \n", "names no host"),
    ("node01 slots=two\n", "line 1: slots=two is not a positive whole number"),
    ("node01 slots=4\nnode02 slots=0\n", "line 2: slots=0 is not a positive whole number"),
    ("node01 slots=4\nnode01 slots=4\n", "line 2: node01 is listed twice"),
    ("node01\n", "line 1: 'node01' is not 'HOSTNAME slots=N'"),
    ("node01 slots=4 extra\n", "is not 'HOSTNAME slots=N'"),
])
def test_bad_hostfiles_are_one_line_naming_file_line_and_reason(tmp_path, text, reason):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_hostfile(path)
    assert reason in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_good_hostfile_keeps_order_and_ignores_comments(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# lab nodes\nnode02 slots=4  # the fast one\n\nnode01 slots=2\n")
    assert read_hostfile(path) == [("node02", 4), ("node01", 2)]


def test_launching_with_a_bad_hostfile_is_one_line_and_exit_2_before_any_launch(tmp_path):
    import subprocess

    from tests.conftest import cli_env

    for text in ("", "localhost slots=two\n", "localhost slots=1\nlocalhost slots=1\n"):
        path = tmp_path / "hosts"
        path.write_text(text)
        proc = subprocess.run(["bash", str(REPO / "launch/run_stage.sh"), "env", "", str(path)], cwd=REPO,
                              env=cli_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", (text, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: hostfile"), proc.stderr
    missing = run_cli("hostfile", str(tmp_path / "absent"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: hostfile {tmp_path / 'absent'}: no such file"


@SETTINGS
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=6))
def test_any_hostfile_text_is_hosts_or_one_config_error(tmp_path, lines):
    path = tmp_path / "hosts"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        hosts = read_hostfile(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert hosts and all(slots >= 1 for _, slots in hosts)


YAML_PIECES = st.sampled_from([
    "run:", "  name: x", "  name: [1, 2", "model:", "  preset: huge", "  hidden_size: -3", "  hidden_size: 12.5",
    "optimizer:", "  lr: fast", "  bogus_key: 1", "pretrain:", "  phases: 3", "  phases: [{seq_len: 128}]",
    "- just a list", "'unterminated", "data: {tokenizer: {kind: train, vocab_size: two}}", "\t", ":", "&a *a",
    "extends: nowhere.yaml", "run: {root: 5}", "finetune: {tasks: [{name: t}]}", "distributed: {backend: carrier}",
])


@SETTINGS
@given(st.lists(YAML_PIECES | st.text(max_size=20), max_size=8))
def test_any_config_text_loads_or_is_one_config_error(tmp_path, lines):
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc).strip(), str(exc)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["model.preset", "optimizer.lr", "pretrain.phases.0.steps", "run.nope",
                                           "pretrain.phases", "data.seq_lengths", "model", "x..y", "=", ""]),
                          st.text(max_size=12)), max_size=4))
def test_any_override_applies_or_is_one_config_error(tmp_path, pairs):
    try:
        load_config(REPO / "configs" / "demo.yaml", [f"{key}={value}" for key, value in pairs])
    except ConfigError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
