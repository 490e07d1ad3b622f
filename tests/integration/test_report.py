"""run-all on two ranks through the launch script ends with a report whose every figure is real."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from tests.conftest import REPO, cli_env, run_cli, write_config
from tests.integration.test_finetune import _bbc_task

PNG = b"\x89PNG\r\n\x1a\n"


def _drawn(path) -> tuple[float, float]:
    """(share of coloured pixels, share of dark pixels): axes and text are grey, data is coloured or dense."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))[..., :3]
    colour = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.25
    dark = pixels.mean(axis=-1) < 0.35
    return float(colour.mean()), float(dark.mean())


@pytest.mark.slow
def test_run_all_ends_with_a_report_whose_links_are_valid_pngs_with_data(tmp_path, bbc_sample, bbc_dir):
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    cfg = {"run": {"name": "rep", "root": str(tmp_path / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(bbc_sample)], "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [64],
                    "validation_fraction": 0.05, "unit_mb": 0.2, "workers": 1},
           "model": {"preset": "mini", "num_layers": 2, "max_position_embeddings": 64},
           "optimizer": {"name": "lamb", "lr": 3e-3},
           "pretrain": {"phases": [{"seq_len": 64, "steps": 12, "global_batch_size": 16, "micro_batch_size": 8}],
                        "precision": "fp32", "checkpoint_every": 6, "eval_every": 4, "eval_batches": 2,
                        "log_every": 2},
           "search": {"max_steps": 8, "check_every": 2, "fifo_size": 3, "head_distance_threshold": 1.0,
                      "ffn_distance_threshold": 1.0},
           "finetune": {"models": ["pretrain", "retrain", "scratch"], "tasks": [_bbc_task(bbc_dir, task_dir, 20)],
                        "epochs": 2, "lr": 1e-3, "batch_size": 16, "precision": "fp32"},
           "distributed": {"ds_config": str(REPO / "ds_configs/cpu_demo.json")}}
    config = write_config(tmp_path / "rep.yaml", cfg)
    proc = subprocess.run(["bash", "launch/run_stage.sh", "run-all", str(config), "hostfiles/localhost"], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = tmp_path / "runs/rep/report/report.md"
    assert f"report: {report}" in proc.stdout + proc.stderr  # the last thing run-all says
    text = report.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    expected = {"costs.png", "mlm.png", "lr.png", "throughput.png", "comm.png", "search_head_masks.png",
                "search_distance.png", "search_kept.png", "finetune_dev.png", "confusion_bbc.png"}
    assert expected <= set(images), set(images)
    for name in images:
        path = report.parent / name
        assert path.read_bytes()[:8] == PNG, name
        assert path.stat().st_size > 8000, name
        colour, dark = _drawn(path)
        assert colour > 0.002 or dark > 0.03, (name, colour, dark)  # more than empty axes and labels
    assert "nothing recorded" not in text
    assert "python -m pipeline run-all" in text and "2 rank(s)" in text  # the command, as run
    baseline = float(re.search(r"cross-entropy \*\*([0-9.]+) nats\*\*", text).group(1))
    assert 4.0 < baseline < np.log(2000)  # a real corpus is far from uniform over the vocab
    for row in ("dense (pretrain)", "search (gates + L1)", "ticket (retrain)", "scratch (random init, control)"):
        assert row in text, row
    assert re.search(r"\| pretrain \| bbc accuracy \| [0-9.]+ \| [0-9.]+ \| [+-][0-9.]+ \|", text)
    # rebuilt from the directory alone: the same page again, the old one replaced whole
    again = run_cli("report", "--config", str(config))
    assert again.returncode == 0 and f"report: {report}" in again.stdout, again.stderr[-2000:]
    assert sorted(p.name for p in report.parent.iterdir()) == sorted(set(images) | {"report.md"})
    assert not list(report.parent.parent.glob(".report.*"))


def test_report_of_a_run_that_does_not_exist_is_one_clear_line(tmp_path):
    config = write_config(tmp_path / "none.yaml", {"run": {"name": "none", "root": str(tmp_path / "runs")}})
    proc = run_cli("report", "--config", str(config))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'runs' / 'none'}: no such run directory "
                                               "(run a stage of none first)"]
