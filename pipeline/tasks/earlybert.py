"""EarlyBERT in fine-tuning: search a ticket on the task, prune, fine-tune the ticket.

The same gates, L1, mask drawing, FIFO rule and structural pruning as the pretraining search
(`stages/search.py`, `earlybird.py`, `model/prune.py`); only the loss is the task's. EarlyBERT's
fine-tuning recipe: search with a small learning rate for at most one epoch, rewind to the
weights before the search (the source's encoder and the same seeded head), prune, fine-tune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import FinetuneConfig
from pipeline.earlybird import random_masks
from pipeline.model.gates import gates_for
from pipeline.model.prune import plan_summary
from pipeline.report.search_plots import plot_search
from pipeline.rundir import atomic_write_json
from pipeline.stages.search import TicketTracker
from pipeline.tasks.data import TaskData
from pipeline.tasks.loop import FineTuner, FitPlan, TaskObjective
from pipeline.tasks.model import ModelSource, build_task_model, train_flops


@dataclass
class Ticket:
    plan: dict
    info: dict  # search steps, seconds, tokens, step of emergence, sizes


def search_ticket(tuner: FineTuner, cfg: FinetuneConfig, source: ModelSource, data: TaskData, out: Path,
                  pad_id: int, seed: int) -> Ticket:
    s = cfg.earlybert.search
    hf = build_task_model(source, data.task.kind, data.num_labels, seed)
    config = hf.config
    if s.mode == "random":  # the ablation: a ticket of the same size, no search
        masks = random_masks(s, (config.num_hidden_layers, config.num_attention_heads),
                             (config.num_hidden_layers, config.intermediate_size), seed)
        return _ticket(masks.to_plan(), config, {"mode": "random", "search_steps": 0, "search_seconds": 0.0,
                                                 "search_tokens": 0, "search_flops": 0.0, "emerged_at": None},
                       out, tuner)
    gates = gates_for(hf)
    tracker = TicketTracker(s, gates, out, tuner.dist.is_main,
                            read=lambda: tuner.engine.fp32_values([gates.heads, gates.ffn]))
    steps_per_epoch = math.ceil(len(data.splits["train"]) / cfg.batch_size)
    budget = min(s.max_steps, max(1, int(cfg.earlybert.search_epochs * steps_per_epoch)))
    plan = FitPlan(epochs=1, lr=cfg.earlybert.search_lr, max_steps=budget, evaluate=False,
                   on_step=lambda step: tracker.after_step(0, step))
    result = tuner.fit(TaskObjective(hf, gates, (s.l1_heads, s.l1_ffn)), data, plan, pad_id,
                       f"{data.task.name}/{source.label}/search")
    if not tracker.steps or tracker.steps[-1] != result.steps:  # the budget ended between checks
        tracker.check(result.steps)
    masks = tracker.masks_of(tracker.snapshots[-1])
    if tuner.dist.is_main and len(tracker.snapshots) > 1:
        plot_search(tracker, out)
    info = {"mode": s.mode, "search_steps": result.steps, "search_budget": budget,
            "search_seconds": result.seconds, "search_tokens": result.train_tokens,
            "search_flops": train_flops(hf, result.train_tokens), "emerged_at": tracker.emerged_at}
    return _ticket(masks.to_plan(), config, info, out, tuner)


def _ticket(plan: dict, config, info: dict, out: Path, tuner: FineTuner) -> Ticket:
    info = {**info, **plan_summary(plan, config)}
    if tuner.dist.is_main:
        atomic_write_json(out / "masks.json", {"plan": plan, **info})
    tuner.dist.barrier()
    return Ticket(plan, info)
