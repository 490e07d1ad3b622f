"""EarlyBERT in fine-tuning: search a ticket on the task, prune, fine-tune the ticket.

The same gates, L1, mask drawing, FIFO rule and structural pruning as the pretraining search
(`stages/search.py`, `earlybird.py`, `model/prune.py`); only the loss is the task's. EarlyBERT's
fine-tuning recipe: search with a small learning rate for at most one epoch, rewind to the
weights before the search (the source's encoder and the same seeded head), prune, fine-tune.

Masks are drawn `checks_per_epoch` times an epoch: the FIFO rule asks that the newest mask be
close to the masks of the last (fifo_size - 1) draws, so with a cadence in steps it could not fire
before (fifo_size - 1) x check_every steps — 40 steps at 10, three quarters of an epoch of BBC
(54 steps of 32) — and a task's epoch, not a step count, is what the paper's draw is measured in.
Tickets: `searched` (the FIFO rule, or `search.mode` as configured), `fixed` (drawn at
`fixed_fraction` of the first epoch, the paper's draw) and `random` (the searched ticket's exact
per-layer sizes, heads and neurons drawn at random: the paper's baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import FinetuneConfig
from pipeline.earlybird import Masks, random_like, random_masks
from pipeline.model.gates import gates_for
from pipeline.model.prune import plan_summary
from pipeline.report.search_plots import plot_search
from pipeline.rundir import atomic_write_json
from pipeline.stages.search import TicketTracker
from pipeline.tasks.data import TaskData
from pipeline.tasks.loop import FineTuner, FitPlan, TaskObjective
from pipeline.tasks.model import ModelSource, build_task_model, train_flops

NO_SEARCH = {"search_steps": 0, "search_seconds": 0.0, "search_tokens": 0, "search_flops": 0.0, "emerged_at": None,
             "emerged_fraction": None}


@dataclass
class Ticket:
    plan: dict
    info: dict  # search steps, seconds, tokens, step of emergence, sizes


def search_rules(cfg: FinetuneConfig, kind: str, steps_per_epoch: int):
    """The search config one ticket kind runs with: the mask cadence from `checks_per_epoch`, and for
    `fixed` the draw at `fixed_fraction` of the first epoch."""
    e = cfg.earlybert
    update = {}
    if e.checks_per_epoch is not None:
        update["check_every"] = max(1, round(steps_per_epoch / e.checks_per_epoch))
    if kind == "fixed":
        update.update(mode="fixed", fixed_step=max(1, round(e.fixed_fraction * steps_per_epoch)))
    return e.search.model_copy(update=update)


def search_ticket(tuner: FineTuner, cfg: FinetuneConfig, source: ModelSource, data: TaskData, out: Path,
                  pad_id: int, seed: int, kind: str = "searched") -> Ticket:
    steps_per_epoch = math.ceil(len(data.splits["train"]) / cfg.batch_size)
    s = search_rules(cfg, kind, steps_per_epoch)
    hf = build_task_model(source, data.task.kind, data.num_labels, seed)
    config = hf.config
    if s.mode == "random":  # a ticket under the size rules, no search
        masks = random_masks(s, (config.num_hidden_layers, config.num_attention_heads),
                             (config.num_hidden_layers, config.intermediate_size), seed)
        return _ticket(masks.to_plan(), config, {"mode": "random", **NO_SEARCH}, out, tuner)
    gates = gates_for(hf)
    tracker = TicketTracker(s, gates, out, tuner.dist.is_main,
                            read=lambda: tuner.engine.fp32_values([gates.heads, gates.ffn]))
    # fixed: the same search (its learning-rate schedule over the whole budget), cut at `fixed_step` by the tracker
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
        _save_history(tracker, out)
    emerged = tracker.emerged_at
    info = {"mode": s.mode, "search_steps": result.steps, "search_budget": budget, "check_every": s.check_every,
            "steps_per_epoch": steps_per_epoch, "search_seconds": result.seconds, "search_tokens": result.train_tokens,
            "search_flops": train_flops(hf, result.train_tokens), "emerged_at": emerged,
            "emerged_fraction": None if emerged is None else emerged / steps_per_epoch,
            "drawn_fraction": result.steps / steps_per_epoch}
    return _ticket(masks.to_plan(), config, info, out, tuner)


def random_ticket(searched: Ticket, config, out: Path, tuner: FineTuner, seed: int) -> Ticket:
    """The searched ticket's per-layer head and neuron counts, which ones drawn at random from `seed`."""
    kept = Masks(_kept(searched.plan["heads"], config.num_attention_heads),
                 _kept(searched.plan["ffn"], config.intermediate_size))
    info = {"mode": "random_like_searched", "random_seed": seed, **NO_SEARCH}
    return _ticket(random_like(kept, seed).to_plan(), config, info, out, tuner)


def _kept(rows: list[list[int]], width: int) -> torch.Tensor:
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for layer, kept in enumerate(rows):
        mask[layer, kept] = True
    return mask


def _save_history(tracker: TicketTracker, out: Path) -> None:
    atomic_write_json(out / "history.json", {"steps": tracker.steps, "head_distances": tracker.detector.head_history,
                                             "ffn_distances": tracker.detector.ffn_history,
                                             "emerged_at": tracker.emerged_at})


def _ticket(plan: dict, config, info: dict, out: Path, tuner: FineTuner) -> Ticket:
    info = {**info, **plan_summary(plan, config)}
    if tuner.dist.is_main:
        atomic_write_json(out / "masks.json", {"plan": plan, **info})
    tuner.dist.barrier()
    return Ticket(plan, info)
