"""Continued pretraining from a saved transformers BERT (`pretrain.init_from`), through the launch script.

The checkpoint is made here: a small headless `BertModel` (as sentence-transformers models are saved)
with the real bert-base-uncased vocab, prepared with `data.tokenizer.kind: pretrained`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from pipeline.data.tokenizer import bundled_vocab
from tests.conftest import REPO, cli_env, run_cli, write_config
from tests.integration.test_pretrain import _kill9_after


def _stage(config: Path, stage: str, hostfile: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/run_stage.sh", stage, str(config), hostfile], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def continued(tmp_path_factory, bbc_sample) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("init_from")
    checkpoint = root / "published"
    torch.manual_seed(7)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(checkpoint))
    shutil.copy(bundled_vocab(), checkpoint / "vocab.txt")
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    base = {"run": {"name": "base", "root": str(root / "runs")},
            "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample)], "doc_split": "file"}],
                     "tokenizer": {"kind": "pretrained"}, "seq_lengths": [64], "validation_fraction": 0.05,
                     "unit_mb": 0.2, "workers": 1},
            "optimizer": {"name": "lamb", "lr": 3e-3},
            "pretrain": {"init_from": str(checkpoint),
                         "phases": [{"seq_len": 64, "steps": 6, "global_batch_size": 16, "micro_batch_size": 8}],
                         "precision": "fp32", "checkpoint_every": 3, "eval_every": 6, "eval_batches": 2,
                         "log_every": 1},
            "search": {"check_every": 2, "fifo_size": 2, "max_steps": 4},
            "retrain": {"fraction": 0.5},
            "distributed": {"ds_config": str(REPO / "ds_configs/pretrain_zero2_lamb.json")}}
    proc = run_cli("prepare", "--config", str(write_config(root / "base.yaml", base)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, checkpoint, base


def _variant(continued, name: str, **sections) -> Path:
    root, _, base = continued
    cfg = json.loads(json.dumps(base))
    cfg["run"]["name"] = name
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    if not (root / "runs" / name / "prepare").exists():
        shutil.copytree(root / "runs" / "base" / "prepare", root / "runs" / name / "prepare")
    return write_config(root / f"{name}.yaml", cfg)


def _encoder_equal(model_dir: Path, checkpoint: Path) -> bool:
    ours, theirs = load_file(model_dir / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    shared = [k for k in theirs if f"bert.{k}" in ours]
    assert len(shared) == len([k for k in theirs if not k.startswith("pooler.")])
    return all(torch.equal(ours[f"bert.{k}"], theirs[k]) for k in shared)


@pytest.mark.slow
def test_a_headless_bert_continues_on_two_ranks_with_zero2_and_search_prune_retrain_follow(continued):
    root, checkpoint, _ = continued
    config = _variant(continued, "zero2")
    proc = _stage(config, "pretrain", "hostfiles/localhost")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stage = root / "runs" / "zero2" / "pretrain"
    record = json.loads((stage / "stage.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    assert "has no MLM head" in proc.stdout + proc.stderr and "tied" in proc.stdout + proc.stderr
    assert not _encoder_equal(stage / "export", checkpoint)  # trained
    assert record["metrics"]["phase0_final_eval_loss"] < record["metrics"]["phase0_initial_eval_loss"]
    for name in ("search", "prune", "retrain"):
        proc = _stage(config, name)
        assert proc.returncode == 0, f"{name}: " + proc.stderr[-3000:]
        assert json.loads((root / "runs/zero2" / name / "stage.json").read_text())["status"] == "complete"
    assert _encoder_equal(root / "runs/zero2/search/rewind", checkpoint)  # the search starts where pretrain does
    exported = root / "runs/zero2/retrain/export"
    assert (exported / "config.json").is_file() and (exported / "vocab.txt").read_text() == \
        (checkpoint / "vocab.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("change,message", [  # positions and unreadable weights: tests/unit/test_init_from.py
    ({"model": {"num_layers": 6}}, "model.num_layers: num_layers 6 contradicts pretrain.init_from's 2"),
    ({"pretrain": {"init_from": "/nonexistent/bert"}}, "pretrain.init_from: /nonexistent/bert is not a directory"),
])
def test_bad_init_from_input_is_one_line_and_exit_2_before_training(continued, change, message):
    root, checkpoint, base = continued
    name = f"bad{len(message)}"
    sections = {k: {**base.get(k, {}), **v} for k, v in change.items()}
    config = _variant(continued, name, **sections)
    proc = run_cli("pretrain", "--config", str(config))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in proc.stderr
    assert not (root / "runs" / name / "pretrain" / "checkpoints").exists()


@pytest.mark.slow
def test_a_vocab_other_than_the_checkpoints_is_refused_before_training(continued, tmp_path):
    root, checkpoint, base = continued
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    lines = (other / "vocab.txt").read_text().splitlines()
    (other / "vocab.txt").write_text("\n".join(lines[:1000] + ["[unused-x]"] + lines[1001:]) + "\n")
    config = _variant(continued, "othervocab", pretrain={**base["pretrain"], "init_from": str(other)})
    proc = run_cli("pretrain", "--config", str(config))
    assert proc.returncode == 2 and "is not the checkpoint's" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_kill9_and_the_rerun_resume_the_runs_own_checkpoint_bit_identically(continued):
    root, _, _ = continued
    straight = _variant(continued, "straight", distributed={"ds_config": str(REPO / "ds_configs/cpu_demo.json")})
    assert _stage(straight, "pretrain").returncode == 0
    killed = _variant(continued, "killed", distributed={"ds_config": str(REPO / "ds_configs/cpu_demo.json")})
    stage = root / "runs" / "killed" / "pretrain"
    _kill9_after(killed, stage, 4)  # asserts the record still says running
    assert any((stage / "checkpoints").glob("*")), "no checkpoint to resume from"
    proc = _stage(killed, "pretrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resum" in proc.stdout + proc.stderr
    a = load_file(root / "runs/straight/pretrain/export/model.safetensors")
    b = load_file(stage / "export/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.long  # the two-host 1-bit LAMB test runs the optimizer in CI
def test_a_headless_bert_continues_with_onebit_lamb_on_two_ranks(continued):
    root, _, base = continued
    config = _variant(continued, "onebit", optimizer={"name": "onebit_lamb", "lr": 3e-3, "freeze_step": 3},
                      distributed={"ds_config": str(REPO / "ds_configs/pretrain_onebit_lamb.json")})
    proc = _stage(config, "pretrain", "hostfiles/localhost")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((root / "runs/onebit/pretrain/stage.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    assert record["metrics"]["phase0_final_eval_loss"] < record["metrics"]["phase0_initial_eval_loss"]
