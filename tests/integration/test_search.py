"""search -> prune -> retrain end to end on a tiny model: search on 2 ranks, the rest on 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ScheduleConfig
from pipeline.model.prune import load_pruned
from pipeline.optim.schedule import lr_factor
from tests.conftest import REPO, cli_env, run_cli, write_config

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.slow
@pytest.mark.long  # make demo runs search -> prune -> retrain
def test_search_prune_retrain(tmp_path, bbc_sample):
    cfg = {"run": {"name": "eb", "root": str(tmp_path / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample)], "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [64],
                    "validation_fraction": 0.05, "unit_mb": 0.2, "workers": 1},
           "model": {"preset": "mini", "num_layers": 2, "max_position_embeddings": 64},
           "optimizer": {"name": "lamb", "lr": 3e-3},
           "pretrain": {"phases": [{"seq_len": 64, "steps": 16, "global_batch_size": 16, "micro_batch_size": 8}],
                        "precision": "fp32", "checkpoint_every": 4, "eval_every": 4, "eval_batches": 2,
                        "log_every": 1},
           # thresholds of 1.0: the ticket must emerge as soon as the FIFO is full (5 checks = step 10)
           "search": {"max_steps": 24, "check_every": 2, "l1_heads": 1e-3, "l1_ffn": 1e-3,
                      "head_distance_threshold": 1.0, "ffn_distance_threshold": 1.0},
           "retrain": {"rewind": "search_end", "fraction": 0.75, "continue_search": True},  # 12 steps, 10 searched
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
    assert history["steps"] == [2, 4, 6, 8, 10]  # and the search stopped there
    assert len(history["head_distances"]) == len(history["ffn_distances"]) == 5
    assert masks["emerged_at"] == 10 and record["metrics"]["trained_steps"] == 10
    assert (search / "head_masks.png").stat().st_size > 1000 and (search / "distance.png").exists()
    for stage in ("prune", "retrain"):
        done = run_cli(stage, "--config", str(config))
        assert done.returncode == 0, done.stderr[-3000:]
    pruned = json.loads((tmp_path / "runs/eb/prune/stage.json").read_text())["metrics"]
    assert pruned["parameters_pruned"] < pruned["parameters_dense"] and pruned["heads_kept"] == 6
    retrain = json.loads((tmp_path / "runs/eb/retrain/stage.json").read_text())["metrics"]
    # the budget: 0.75 x 16 steps = 12, of which the search trained 10; the schedule goes on from step 10
    assert retrain["phase0_steps"] == 2 and retrain["tokens_per_s"] > 0
    logged = [json.loads(line) for line in (tmp_path / "runs/eb/retrain/metrics.jsonl").read_text().splitlines()]
    lr_after_first = next(r["lr"] for r in logged if r.get("step") == 1)
    assert abs(lr_after_first - 3e-3 * lr_factor(11, 12, ScheduleConfig())) < 1e-9
    model = load_pruned(tmp_path / "runs/eb/retrain/export")
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 3


@pytest.mark.slow
def test_masks_under_bf16_are_drawn_from_the_fp32_masters(tmp_path):
    """Gate values closer to 1.0 than bf16 resolves: the masks are those of the fp32 values (ZeRO-1 and stage 0)."""
    out = tmp_path / "gates.json"
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29741",
                           str(Path(__file__).with_name("gates_worker.py")), str(out)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ds, seen in json.loads(out.read_text()).items():
        assert seen["module_dtype"] == "torch.bfloat16", (ds, seen)
        assert seen["masters_exact"] and seen["masks_equal_fp32"], (ds, seen)
        assert not seen["module_masks_equal_fp32"], (ds, seen)  # what reading the bf16 copies gave


@pytest.mark.slow
@pytest.mark.long  # resume exactness: the pretrain kill -9 test
def test_search_killed_at_a_random_step_finds_the_same_ticket(tmp_path, bbc_sample):
    import os
    import random
    import signal
    import time

    import torch

    base = {"run": {"name": "straight", "root": str(tmp_path / "runs")},
            "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample)], "doc_split": "file"}],
                     "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [64],
                     "validation_fraction": 0.05, "unit_mb": 0.2, "workers": 1},
            "model": {"preset": "tiny", "max_position_embeddings": 64},
            "optimizer": {"name": "lamb", "lr": 3e-3},
            "pretrain": {"phases": [{"seq_len": 64, "steps": 40, "global_batch_size": 16, "micro_batch_size": 8}],
                         "precision": "fp32", "checkpoint_every": 4, "eval_every": 100, "eval_batches": 2,
                         "log_every": 1},
            "search": {"max_steps": 20, "check_every": 2, "l1_heads": 1e-3, "l1_ffn": 1e-3},
            "distributed": {"ds_config": str(REPO / "ds_configs/cpu_demo.json")}}
    straight = write_config(tmp_path / "straight.yaml", base)
    assert run_cli("prepare", "--config", str(straight)).returncode == 0
    killed = write_config(tmp_path / "killed.yaml", {**base, "run": {**base["run"], "name": "killed"}})
    (tmp_path / "runs/killed").mkdir(parents=True)
    (tmp_path / "runs/killed/prepare").symlink_to(tmp_path / "runs/straight/prepare")
    done = run_cli("search", "--config", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    kill_at = int(os.environ.get("PIPELINE_TEST_KILL_AT", 0)) or random.Random().randint(3, 17)
    stage = tmp_path / "runs/killed/search"
    runner = subprocess.Popen([sys.executable, "-m", "pipeline", "search", "--config", str(killed)], cwd=REPO,
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and runner.poll() is None:
        metrics = stage / "metrics.jsonl"
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= kill_at:
            break
        time.sleep(0.02)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    resumed = run_cli("search", "--config", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / "runs" / name / "search/masks.json").read_text()) for name in ("straight", "killed"))
    assert a["plan"] == b["plan"] and a["emerged_at"] == b["emerged_at"], f"killed at {kill_at}"
    ha, hb = (json.loads((tmp_path / "runs" / name / "search/history.json").read_text())
              for name in ("straight", "killed"))
    assert ha == hb, f"killed at {kill_at}"
    ga, gb = (torch.load(tmp_path / "runs" / name / "search/end/gates.pt") for name in ("straight", "killed"))
    assert torch.equal(ga["heads"], gb["heads"]) and torch.equal(ga["ffn"], gb["ffn"]), f"killed at {kill_at}"
