"""search -> prune -> retrain end to end on a tiny model: search on 2 ranks, the rest on 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.model.prune import load_pruned
from tests.conftest import REPO, cli_env, run_cli, write_config

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.slow
def test_search_prune_retrain(tmp_path, bbc_sample):
    cfg = {"run": {"name": "eb", "root": str(tmp_path / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample)], "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [64],
                    "validation_fraction": 0.05, "unit_mb": 0.2, "workers": 1},
           "model": {"preset": "mini", "num_layers": 2, "max_position_embeddings": 64},
           "optimizer": {"name": "lamb", "lr": 3e-3},
           "pretrain": {"phases": [{"seq_len": 64, "steps": 8, "global_batch_size": 16, "micro_batch_size": 8}],
                        "precision": "fp32", "checkpoint_every": 4, "eval_every": 4, "eval_batches": 2,
                        "log_every": 2},
           "search": {"max_steps": 24, "check_every": 2, "l1_heads": 1e-3, "l1_ffn": 1e-3},
           "distributed": {"ds_config": str(REPO / "ds_configs/cpu_demo.json")}}
    config = write_config(tmp_path / "eb.yaml", cfg)
    assert run_cli("prepare", "--config", str(config)).returncode == 0
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29740", "-m", "pipeline",
                           "search", "--config", str(config)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    search = tmp_path / "runs/eb/search"
    record = json.loads((search / "stage.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    masks = json.loads((search / "masks.json").read_text())
    assert [len(h) for h in masks["plan"]["heads"]] == [3, 3]  # 1/3 of 4 heads pruned in each layer
    assert masks["ffn_kept"] == round(0.6 * 2 * 1024)  # 40% of FFN neurons pruned globally
    history = json.loads((search / "history.json").read_text())
    assert len(history["distances"]) == len(history["steps"]) >= 5
    assert masks["emerged_at"] is None or masks["emerged_at"] <= 24
    assert (search / "head_masks.png").stat().st_size > 1000 and (search / "distance.png").exists()
    for stage in ("prune", "retrain"):
        done = run_cli(stage, "--config", str(config))
        assert done.returncode == 0, done.stderr[-3000:]
    pruned = json.loads((tmp_path / "runs/eb/prune/stage.json").read_text())["metrics"]
    assert pruned["parameters_pruned"] < pruned["parameters_dense"] and pruned["heads_kept"] == 6
    retrain = json.loads((tmp_path / "runs/eb/retrain/stage.json").read_text())["metrics"]
    assert retrain["tokens_per_s"] > 0 and retrain["phase0_final_eval_loss"] < retrain["phase0_initial_eval_loss"]
    model = load_pruned(tmp_path / "runs/eb/retrain/export")
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 3
