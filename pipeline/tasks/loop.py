"""The fine-tuning loop: the DeepSpeed engine, AdamW with linear warmup/decay, evaluation every epoch.

Each rank takes its slice of every global batch (a seeded permutation per epoch, the same on
every rank), the engine all-reduces the gradients, and evaluation is sharded and gathered so
every rank computes the same metrics and agrees on the best epoch. The best epoch's weights
are kept in memory and saved (rank 0) to `best/`; at the end they are the loaded weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from pipeline.config import FinetuneConfig
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.errors import ConfigError
from pipeline.tasks import squad
from pipeline.tasks.data import Split, TaskData
from pipeline.tasks.metrics import primary_metric, squad_metrics, task_metrics


class TaskObjective(nn.Module):
    """The task model, plus L1 on slimming gates while a ticket is searched."""

    def __init__(self, hf: nn.Module, gates: nn.Module | None = None, l1: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.hf, self.gates, self.l1 = hf, gates, l1

    def forward(self, **batch: torch.Tensor):
        out = self.hf(**batch)
        if self.gates is not None and out.loss is not None:
            out.loss = out.loss + self.gates.l1(*self.l1)
        return out


@dataclass
class FitPlan:
    epochs: int
    lr: float
    max_steps: int | None = None  # a search budget shorter than the epochs
    evaluate: bool = True
    on_step: Callable[[int], bool] | None = None  # step -> stop now
    best_dir: Path | None = None
    save_best: Callable[[nn.Module, Path], None] | None = None


@dataclass
class FitResult:
    steps: int = 0
    seconds: float = 0.0
    train_tokens: int = 0  # non-pad tokens trained on, summed over ranks
    history: list[dict] = field(default_factory=list)  # per epoch: dev metrics
    best: dict = field(default_factory=dict)
    best_epoch: int | None = None
    stopped: bool = False  # `on_step` ended it early (a ticket emerged)
    train_loss: float = 0.0  # mean over the last epoch's steps


class FineTuner:
    def __init__(self, cfg: FinetuneConfig, ds_config_path: Path, dist, log, seed: int, tb_dir: Path | None = None):
        self.cfg, self.ds_config_path, self.dist, self.log, self.seed = cfg, ds_config_path, dist, log, seed
        self.tb_dir = tb_dir
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"finetune.batch_size: {cfg.batch_size} is not a multiple of the {dist.world_size} ranks")

    def fit(self, objective: TaskObjective, data: TaskData, plan: FitPlan, pad_id: int, name: str) -> FitResult:
        train = data.splits["train"]
        steps_per_epoch = math.ceil(len(train) / self.cfg.batch_size)
        total = steps_per_epoch * plan.epochs if plan.max_steps is None else min(plan.max_steps,
                                                                                   steps_per_epoch * plan.epochs)
        engine = self.engine = self._engine(objective, plan.lr, total, name)  # hooks may read it (gates)
        result, best_state, start = FitResult(), None, time.perf_counter()
        metric = primary_metric(data.task.kind)
        for epoch in range(plan.epochs):
            self._epoch(engine, train, epoch, total, pad_id, result, plan.on_step)
            if plan.evaluate:
                scores = self.evaluate(engine.module.hf, data, "dev", pad_id)[0]
                scores.update(epoch=epoch + 1, step=result.steps, train_loss=result.train_loss)
                result.history.append(scores)
                self.log.info(f"{name}: epoch {epoch + 1}/{plan.epochs}  dev " +
                              "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
                if result.best_epoch is None or scores[metric] > result.best[metric]:
                    result.best, result.best_epoch = scores, epoch + 1
                    best_state = {k: v.detach().clone() for k, v in engine.module.hf.state_dict().items()}
                    if plan.save_best is not None and self.dist.is_main:
                        plan.save_best(engine.module.hf, plan.best_dir)
            if result.stopped or result.steps >= total:
                break
        result.seconds = time.perf_counter() - start
        if best_state is not None:
            engine.module.hf.load_state_dict(best_state)
        self.dist.barrier()
        return result

    def _engine(self, objective: nn.Module, lr: float, total_steps: int, name: str) -> Engine:
        groups = {True: [], False: []}  # biases, LayerNorms and gates (L1 instead) take no weight decay
        for n, p in objective.named_parameters():
            groups[p.ndim < 2 or "LayerNorm" in n or "gates" in n].append(p)
        optimizer = torch.optim.AdamW([{"params": groups[False], "weight_decay": self.cfg.weight_decay},
                                       {"params": groups[True], "weight_decay": 0.0}], lr=lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.cfg.warmup * total_steps), total_steps)
        micro = self.cfg.batch_size // self.dist.world_size
        batch = BatchPlan(micro, 1, self.dist.world_size, self.cfg.precision, self.cfg.grad_clip)
        tb = self.tb_dir / name if self.tb_dir is not None else None
        config = ds_config(self.ds_config_path, batch, tensorboard_dir=tb, job_name=name, section="finetune")
        return Engine(objective, optimizer, scheduler, config, self.dist)

    def _epoch(self, engine: Engine, train: Split, epoch: int, total: int, pad_id: int, result: FitResult,
               on_step) -> None:
        """One pass over the (shuffled) train split, or less when the budget ends or `on_step` says stop."""
        gbs, micro, rank = self.cfg.batch_size, self.cfg.batch_size // self.dist.world_size, self.dist.rank
        order = epoch_order(train.lengths(), gbs, self.seed * 1000 + epoch)
        steps = len(order) // gbs
        engine.module.train()
        tokens = torch.zeros(2, dtype=torch.float64)  # non-pad tokens, summed loss
        for step in range(steps):
            indices = order[step * gbs + rank * micro: step * gbs + (rank + 1) * micro].tolist()
            batch = train.batch(indices, pad_id)
            out = engine(**batch)
            tokens += torch.tensor([float(batch["attention_mask"].sum()), float(out.loss.detach())],
                                   dtype=torch.float64)
            engine.backward(out.loss)
            engine.step()
            result.steps += 1
            result.stopped = on_step is not None and on_step(result.steps)
            if result.stopped or result.steps >= total:
                break
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(tokens)
        result.train_tokens += int(tokens[0])
        result.train_loss = float(tokens[1]) / max(1, (step + 1) * self.dist.world_size)

    @torch.no_grad()
    def evaluate(self, hf: nn.Module, data: TaskData, split: str, pad_id: int) -> tuple[dict, object]:
        """(metrics or {} for an unlabelled split, predictions): every rank predicts a slice, all gather."""
        part = data.splits[split]
        mine = list(range(self.dist.rank, len(part), self.dist.world_size))
        step = max(1, self.cfg.eval_batch_size // self.dist.world_size)
        hf.eval()
        rows = []
        for i in range(0, len(mine), step):
            indices = mine[i:i + step]
            batch = {k: v.to(next(hf.parameters()).device) for k, v in part.batch(indices, pad_id).items()
                     if k not in ("labels", "start_positions", "end_positions")}
            out = hf(**batch)
            logits = torch.stack([out.start_logits, out.end_logits], 1) if data.task.kind == "squad" else out.logits
            rows += list(zip(indices, logits.float().cpu()))
        hf.train()
        gathered = sorted((r for ranks in self.dist.all_gather_object(rows) for r in ranks), key=lambda r: r[0])
        logits = torch.stack([r[1] for r in gathered])
        return _score(data, part, logits)


def epoch_order(lengths: list[int], global_batch: int, seed: int, group: int = 50) -> torch.Tensor:
    """A shuffled order of rows, padded to whole global batches, in which each batch holds rows of similar length.

    Rows are shuffled, cut into groups of `group` batches, sorted by length inside each group,
    cut into batches, and the batches shuffled: batches stay random, but short texts are not padded
    to a long neighbour's length (about half the tokens of a random batch on review snippets).
    The last batch wraps around to the start, so every rank gets a full slice of every batch.
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen)
    steps = math.ceil(len(lengths) / global_batch)
    order = order.repeat(math.ceil(steps * global_batch / len(lengths)))[: steps * global_batch]
    size = torch.tensor(lengths)[order]
    chunks = []
    for start in range(0, len(order), global_batch * group):
        part = slice(start, start + global_batch * group)
        chunks.append(order[part][torch.argsort(size[part], descending=True, stable=True)])
    batches = torch.cat(chunks).view(steps, global_batch)
    return batches[torch.randperm(steps, generator=gen)].reshape(-1)


def _score(data: TaskData, part: Split, logits: torch.Tensor) -> tuple[dict, object]:
    kind = data.task.kind
    if kind == "squad":
        if not any(e.answers for e in part.examples) and not data.task.version_2:
            return {}, squad.postprocess(part.examples, part.features, logits[:, 0], logits[:, 1])
        answers = squad.postprocess(part.examples, part.features, logits[:, 0], logits[:, 1],
                                    version_2=data.task.version_2)
        references = {e.id: list(e.answers) for e in part.examples}
        return squad_metrics(answers, references), answers
    predictions = logits.argmax(-1) if kind == "classification" else logits.squeeze(-1)
    if part.labels is None:
        return {}, predictions
    return task_metrics(kind, predictions.tolist(), part.labels.tolist(), data.num_labels), predictions
