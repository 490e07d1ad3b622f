"""The flagship recipe (configs/bert-base-academic.yaml) runs end to end with only its sizes changed."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from tests.conftest import REPO, run_cli

FLAGSHIP = REPO / "configs" / "bert-base-academic.yaml"


def _phase(index: int, **sizes: int) -> list[str]:
    return [f"pretrain.phases.{index}.{key}={value}" for key, value in sizes.items()]


def test_flagship_is_a_complete_recipe():
    cfg = load_config(FLAGSHIP)
    one, two = cfg.pretrain.phases
    assert (one.seq_len, one.steps, one.global_batch_size, one.lr, one.warmup) == (128, 7038, 65536, 6e-3, 0.2843)
    assert (two.seq_len, two.steps, two.global_batch_size, two.lr, two.warmup) == (512, 1563, 32768, 4e-3, 0.128)
    assert cfg.optimizer.name == "lamb" and cfg.model.preset == "base" and cfg.finetune.tasks


@pytest.mark.long  # the recipe itself is checked above; make demo runs every stage on CPU
def test_flagship_runs_every_stage_on_cpu_with_size_overrides(tmp_path, bbc_sample):
    tasks = REPO / ".cache" / "tasks" / "bbc"
    rows = (tasks / "train.tsv").read_text().splitlines()
    train = tmp_path / "bbc_train.tsv"  # a size override too: 200 of the 1,804 training articles
    train.write_text("\n".join(rows[:1] + rows[1::9][:200]) + "\n")
    task = (f"[{{name: bbc, kind: classification, train: {train}, dev: {tasks / 'dev.tsv'}, "
            f"text_column: text, max_seq_len: 64, epochs: 1}}]")
    sizes = [f"run.root={tmp_path}", "run.name=flagship",
             f"data.sources=[{{kind: text, paths: [{bbc_sample}], doc_split: file}}]", "data.workers=1",
             "data.validation_fraction=0.05", "model.preset=tiny",
             *_phase(0, steps=6, global_batch_size=8, micro_batch_size=4),
             *_phase(1, steps=2, global_batch_size=4, micro_batch_size=2),
             "pretrain.eval_every=2", "pretrain.eval_batches=1", "search.check_every=1", "search.max_steps=3",
             f"finetune.tasks={task}"]
    proc = run_cli("run-all", "--config", str(FLAGSHIP), *[x for s in sizes for x in ("--set", s)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "flagship"
    for stage in ("prepare", "pretrain", "search", "prune", "retrain", "finetune"):
        assert json.loads((run / stage / "stage.json").read_text())["status"] == "complete", stage
    pretrain = json.loads((run / "pretrain" / "stage.json").read_text())["metrics"]
    assert (pretrain["phase0_steps"], pretrain["phase1_steps"]) == (6, 2)
    saved = load_config(run / "config.yaml")  # what ran: the recipe with only the sizes changed
    assert saved.pretrain.phases[1].lr == 4e-3 and saved.optimizer.name == "lamb" and saved.pretrain.precision == "bf16"
    results = json.loads((run / "finetune" / "results.json").read_text())["results"]
    assert {r["model"] for r in results} == {"pretrain", "retrain"}
