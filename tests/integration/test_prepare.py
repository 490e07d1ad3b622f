"""The prepare stage end to end on real text, through the CLI and real launchers."""

from __future__ import annotations

import filecmp
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, cli_env, run_cli, write_config

VENV_BIN = Path(sys.executable).parent


def _config(tmp_path: Path, corpus: Path, name: str = "p", **data) -> Path:
    cfg = {"run": {"name": name, "root": str(tmp_path / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(corpus)], "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [64, 128],
                    "validation_fraction": 0.05, "unit_mb": 0.05, "workers": 1, **data}}
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _stage(tmp_path: Path, name: str = "p") -> Path:
    return tmp_path / "runs" / name / "prepare"


def _shard_files(stage: Path) -> list[Path]:
    return sorted(p.relative_to(stage) for p in (stage / "shards").rglob("*.bin"))


def _same_output(a: Path, b: Path) -> None:
    assert _shard_files(a) == _shard_files(b) and _shard_files(a)
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in _shard_files(a)] + ["manifest.json",
                                               "tokenizer/vocab.txt"], shallow=False)
    assert not mismatch and not errors


@pytest.mark.slow
def test_prepare_real_corpus_then_skip_then_force(tmp_path, bbc_sample):
    config = _config(tmp_path, bbc_sample, workers=2)
    first = run_cli("prepare", "--config", str(config))
    assert first.returncode == 0, first.stderr
    stage = _stage(tmp_path)
    record = json.loads((stage / "stage.json").read_text())
    manifest = json.loads((stage / "manifest.json").read_text())
    assert record["status"] == "complete" and record["metrics"]["docs"] == 300
    assert manifest["units"] > 2 and manifest["tokenizer"]["vocab_size"] == 2000
    assert manifest["tokenizer"]["dtype"] == "uint16"
    assert "tokens/s" in first.stdout and "sequences_L128_train" in first.stdout
    second = run_cli("prepare", "--config", str(config))
    assert second.returncode == 0 and "up to date" in second.stderr
    assert json.loads((stage / "stage.json").read_text()) == record
    forced = run_cli("prepare", "--config", str(config), "--force")
    assert forced.returncode == 0 and "previous output moved" in forced.stderr
    _same_output(stage, next(stage.parent.glob("prepare.old-*")))


@pytest.mark.slow
def test_byte_identical_shards_for_1_2_3_ranks(tmp_path, bbc_sample):
    """Work is split by unit, not by rank: mpirun -n 2 and torchrun x3 write the same bytes as 1 rank."""
    runs = {}
    for ranks, launcher in ((1, []), (2, [str(VENV_BIN / "mpirun"), "-n", "2"]),
                            (3, [str(VENV_BIN / "torchrun"), "--nproc_per_node", "3"])):
        config = _config(tmp_path, bbc_sample, name=f"r{ranks}")
        cmd = launcher + ([sys.executable] if ranks != 3 else []) + ["-m", "pipeline", "prepare",
                                                                     "--config", str(config)]
        proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stage = _stage(tmp_path, f"r{ranks}")
        assert json.loads((stage / "stage.json").read_text())["world_size"] == ranks
        runs[ranks] = stage
    _same_output(runs[1], runs[2])
    _same_output(runs[1], runs[3])


@pytest.mark.slow
def test_kill9_then_rerun_gives_identical_output(tmp_path, bbc_dir):
    reference = _config(tmp_path, bbc_dir, name="ref", unit_mb=0.25)
    assert run_cli("prepare", "--config", str(reference)).returncode == 0
    config = _config(tmp_path, bbc_dir, name="killed", unit_mb=0.25)
    stage = _stage(tmp_path, "killed")
    for wanted_units in (2, 6):  # kill twice, at different points
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "prepare", "--config", str(config)], cwd=REPO,
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while len(list((stage / "units").glob("*.json"))) < wanted_units and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        record = json.loads((stage / "stage.json").read_text())
        assert record["status"] == "running"  # never "complete" for a killed stage
        assert not (stage / "manifest.json").exists()
    finished = run_cli("prepare", "--config", str(config))
    assert finished.returncode == 0, finished.stderr
    assert "already done by an earlier run, reused" in finished.stderr
    _same_output(_stage(tmp_path, "ref"), stage)
    assert not list(stage.rglob("*.tmp*"))


def test_bad_inputs_are_reported_in_the_table(tmp_path, bbc_sample):
    corpus = tmp_path / "mixed"
    corpus.mkdir()
    for article in sorted((bbc_sample / "tech").glob("*.txt"))[:20]:
        (corpus / article.name).write_bytes(article.read_bytes())
    (corpus / "latin1.txt").write_bytes("Caf\xe9 prices rose sharply in the capital.".encode("latin-1"))
    (corpus / "blob.txt").write_bytes(bytes(range(256)) * 64)
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "huge.txt").write_bytes(b"y" * 300_000)
    config = _config(tmp_path, corpus, seq_lengths=[64], max_line_chars=100_000, unit_mb=1)
    proc = run_cli("prepare", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((_stage(tmp_path) / "manifest.json").read_text())["stats"]
    assert stats["invalid_utf8_line"] == 1 and stats["binary_file"] == 1
    assert stats["empty_file"] == 1 and stats["long_line"] == 1
    assert "skipped: binary_file" in proc.stdout and "skipped: long_line" in proc.stdout


@pytest.mark.parametrize("problem", ["missing_path", "bad_vocab", "bad_dump"])
def test_bad_inputs_fail_before_any_work(tmp_path, problem):
    data: dict = {}
    if problem == "missing_path":
        data["sources"] = [{"kind": "text", "paths": [str(tmp_path / "no_such_dir")]}]
        expected = "matches no file"
    elif problem == "bad_vocab":
        vocab = tmp_path / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"]) + "\n")
        (tmp_path / "c.txt").write_text("hello")
        data["sources"] = [{"kind": "text", "paths": [str(tmp_path / "c.txt")]}]
        data["tokenizer"] = {"kind": "vocab_file", "vocab_file": str(vocab)}
        expected = "lacks the special token(s) [MASK]"
    else:
        (tmp_path / "dump.xml.bz2").write_bytes(b"this is not bzip2")
        data["sources"] = [{"kind": "wiki_xml", "paths": [str(tmp_path / "dump.xml.bz2")]}]
        expected = "not a readable MediaWiki XML dump"
    config = _config(tmp_path, tmp_path, **data)
    proc = run_cli("prepare", "--config", str(config))
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line.lower()]) == 1
    assert "Traceback" not in proc.stderr
    assert not (_stage(tmp_path) / "manifest.json").exists()


def test_downstream_stage_refuses_without_its_input(tmp_path):
    config = _config(tmp_path, tmp_path)
    proc = run_cli("pretrain", "--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: stage 'pretrain' needs stage 'prepare', which has not run "
                                   f"(no {_stage(tmp_path) / 'stage.json'}); run `python -m pipeline prepare` first")


def test_wiki_and_jsonl_sources_together(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"Sentence {i} about the sea and the sky."}) for i in range(40)))
    sources = [{"kind": "wiki_xml", "paths": [str(REPO / "tests/fixtures/wiki/enwiki-excerpt.xml.bz2")]},
               {"kind": "jsonl", "paths": [str(jsonl)]}]
    config = _config(tmp_path, tmp_path, sources=sources, tokenizer={"kind": "bert-base-uncased"})
    cfg = yaml.safe_load(config.read_text())
    cfg["run"]["root"] = "runs"  # relative: resolved from where the command starts
    write_config(config, cfg)
    proc = run_cli("prepare", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((_stage(tmp_path) / "manifest.json").read_text())
    assert manifest["stats"]["docs_train"] + manifest["stats"].get("docs_valid", 0) == 44
    assert manifest["tokenizer"]["vocab_size"] == 30522 and manifest["units"] == 2
