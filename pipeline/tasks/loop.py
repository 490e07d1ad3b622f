"""The fine-tuning loop: the DeepSpeed engine, AdamW with linear warmup/decay, evaluation every epoch.

Each rank takes its slice of every global batch (a seeded permutation per epoch, the same on
every rank), the engine all-reduces the gradients, and evaluation is sharded and gathered so
every rank computes the same metrics and agrees on the best epoch. The best epoch's weights
are kept in memory and saved (rank 0) to `best/`; at the end they are the loaded weights.

With a checkpoint folder (`FitPlan.ckpt_dir`), the fit saves every `finetune.checkpoint_every`
steps, after each epoch's evaluation, and on a stop signal or the deadline (all ranks agree at a
step boundary, as in pretraining); a rerun resumes from the newest verified checkpoint mid-epoch
and, on CPU, ends with the same metrics and weights as an uninterrupted fit. Progress (step, loss,
rate, ETA) is logged every `run.progress_seconds` (30 by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from pipeline import checkpoint
from pipeline.config import FinetuneConfig
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.errors import ConfigError, StageInputError, Stopped
from pipeline.optim.build import adamw
from pipeline.optim.groups import param_groups
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
    ckpt_dir: Path | None = None  # checkpoints for resuming mid-epoch (None: a rerun starts the fit over)


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


@dataclass
class FitState:
    """Where a fit is: what a checkpoint holds besides the engine's own state."""

    result: FitResult = field(default_factory=FitResult)
    epoch: int = 0
    step_in_epoch: int = 0  # steps of `epoch` done
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0])  # this epoch's non-pad tokens, summed loss
    best_state: dict | None = None

    def client(self) -> dict:
        return {"result": asdict(self.result), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "sums": list(self.sums), "best_state": self.best_state}

    @classmethod
    def from_client(cls, client: dict) -> FitState:
        return cls(FitResult(**client["result"]), client["epoch"], client["step_in_epoch"], client["sums"],
                   client["best_state"])


class Progress:
    """A log line every `every` seconds on rank 0: where the fit is, its rate and the time left."""

    def __init__(self, name: str, total: int, done: int, log, main: bool, every: float = 30.0):
        self.name, self.total, self.first, self.log, self.main, self.every = name, total, done, log, main, every
        self.start = self.last = time.perf_counter()

    def step(self, epoch: int, epochs: int, steps: int, loss: float) -> None:
        now = time.perf_counter()
        if not self.main or now - self.last < self.every:
            return
        self.last = now
        rate = (steps - self.first) / max(now - self.start, 1e-9)
        left = (self.total - steps) / max(rate, 1e-9)
        self.log.info(f"{self.name}: epoch {epoch + 1}/{epochs}  step {steps}/{self.total}  loss {loss:.4f}  "
                      f"{rate:.2f} steps/s  ETA {time.strftime('%H:%M:%S', time.gmtime(left))} (training)")


class FineTuner:
    def __init__(self, cfg: FinetuneConfig, ds_config_path: Path, dist, log, seed: int, tb_dir: Path | None = None,
                 stop=None, progress_seconds: float = 30.0):
        self.cfg, self.ds_config_path, self.dist, self.log, self.seed = cfg, ds_config_path, dist, log, seed
        self.tb_dir, self.stop = tb_dir, stop  # stop: pipeline.stopping.StopRequests
        self.progress_seconds = progress_seconds
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"finetune.batch_size: {cfg.batch_size} is not a multiple of the {dist.world_size} ranks")

    def fit(self, objective: TaskObjective, data: TaskData, plan: FitPlan, pad_id: int, name: str) -> FitResult:
        steps_per_epoch = math.ceil(len(data.splits["train"]) / self.cfg.batch_size)
        total = steps_per_epoch * plan.epochs if plan.max_steps is None else min(plan.max_steps,
                                                                                   steps_per_epoch * plan.epochs)
        engine = self.engine = self._engine(objective, plan.lr, total, name)  # hooks may read it (gates)
        state = self._resume(engine, plan, name)
        listening = plan.ckpt_dir is not None and self.stop is not None
        if listening:
            self.stop.listening = True  # a signal now waits for the step boundary, then saves
        try:
            self._fit(engine, data, plan, pad_id, name, total, state)
        finally:
            if listening:
                self.stop.listening = False
        if listening and self.stop.received:  # after the last boundary: the last epoch is redone on a rerun
            raise Stopped(f"{self.stop.received} received as the fit ended; run the same command to resume")
        if state.best_state is not None:
            engine.module.hf.load_state_dict(state.best_state)
        self.dist.barrier()
        return state.result

    def _fit(self, engine: Engine, data: TaskData, plan: FitPlan, pad_id: int, name: str, total: int,
             state: FitState) -> None:
        result, metric = state.result, primary_metric(data.task.kind)
        progress = Progress(name, total, result.steps, self.log, self.dist.is_main, self.progress_seconds)
        start = self._started = time.perf_counter() - result.seconds  # earlier, interrupted runs' included
        for epoch in range(state.epoch, plan.epochs):
            self._epoch(engine, data.splits["train"], epoch, total, pad_id, state, plan, progress)
            if plan.evaluate:
                scores = self.evaluate(engine.module.hf, data, "dev", pad_id)[0]
                scores.update(epoch=epoch + 1, step=result.steps, train_loss=result.train_loss)
                result.history.append(scores)
                self.log.info(f"{name}: epoch {epoch + 1}/{plan.epochs}  dev " +
                              "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
                if result.best_epoch is None or scores[metric] > result.best[metric]:
                    result.best, result.best_epoch = scores, epoch + 1
                    state.best_state = {k: v.detach().clone() for k, v in engine.module.hf.state_dict().items()}
                    if plan.save_best is not None and self.dist.is_main:
                        plan.save_best(engine.module.hf, plan.best_dir)
            state.epoch, state.step_in_epoch, state.sums = epoch + 1, 0, [0.0, 0.0]
            result.seconds = time.perf_counter() - start
            done = result.stopped or result.steps >= total
            if plan.ckpt_dir is not None:
                self._epoch_end(engine, plan, state, done)
            if done:
                break
        result.seconds = time.perf_counter() - start

    def _epoch_end(self, engine: Engine, plan: FitPlan, state: FitState, done: bool) -> None:
        """Save after the evaluation (a rerun does not repeat it); a stop signal that came during it is
        agreed here, a boundary every rank reaches."""
        reason = self.stop.agreed(self.dist.world_size) if self.stop is not None else None
        if not done or reason is not None:
            self._save(engine, plan, state, state.epoch)
        if reason is not None:
            raise Stopped(f"{reason}: saved after epoch {state.epoch} "
                          f"({checkpoint.tag_for(state.epoch, state.result.steps)}); run the same command to resume")

    def _engine(self, objective: nn.Module, lr: float, total_steps: int, name: str) -> Engine:
        optimizer = adamw(param_groups(objective, self.cfg.weight_decay), lr=lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.cfg.warmup * total_steps), total_steps)
        micro = self.cfg.batch_size // self.dist.world_size
        batch = BatchPlan(micro, 1, self.dist.world_size, self.cfg.precision, self.cfg.grad_clip)
        tb = self.tb_dir / name if self.tb_dir is not None else None
        config = ds_config(self.ds_config_path, batch, tensorboard_dir=tb, job_name=name, section="finetune")
        return Engine(objective, optimizer, scheduler, config, self.dist)

    def _epoch(self, engine: Engine, train: Split, epoch: int, total: int, pad_id: int, state: FitState,
               plan: FitPlan, progress: Progress) -> None:
        """One pass over the (shuffled) train split from `state.step_in_epoch`, or less when the budget ends
        or `on_step` says stop."""
        gbs, micro, rank = self.cfg.batch_size, self.cfg.batch_size // self.dist.world_size, self.dist.rank
        order = epoch_order(train.lengths(), gbs, self.seed * 1000 + epoch)
        steps, result = len(order) // gbs, state.result
        engine.module.train()
        sums = torch.tensor(state.sums, dtype=torch.float64)  # non-pad tokens, summed loss
        for step in range(state.step_in_epoch, steps):
            indices = order[step * gbs + rank * micro: step * gbs + (rank + 1) * micro].tolist()
            batch = train.batch(indices, pad_id)
            out = engine(**batch)
            sums += torch.tensor([float(batch["attention_mask"].sum()), float(out.loss.detach())],
                                 dtype=torch.float64)
            engine.backward(out.loss)
            engine.step()
            result.steps += 1
            state.step_in_epoch, state.sums = step + 1, sums.tolist()
            result.stopped = plan.on_step is not None and plan.on_step(result.steps)
            progress.step(epoch, plan.epochs, result.steps, float(sums[1]) / (step + 1))
            if result.stopped or result.steps >= total:
                break
            if plan.ckpt_dir is not None:
                self._checkpoint_or_stop(engine, plan, state, epoch, last=step + 1 == steps)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(sums)
        result.train_tokens += int(sums[0])
        result.train_loss = float(sums[1]) / max(1, state.step_in_epoch * self.dist.world_size)

    def _checkpoint_or_stop(self, engine: Engine, plan: FitPlan, state: FitState, epoch: int, last: bool) -> None:
        """Every `checkpoint_every` steps (the epoch's last step: saved after its evaluation), and when every
        rank agrees to stop (a signal or the deadline): save, then leave with `Stopped`."""
        reason = self.stop.agreed(self.dist.world_size) if self.stop is not None else None
        if reason is not None or (state.result.steps % self.cfg.checkpoint_every == 0 and not last):
            self._save(engine, plan, state, epoch)
        if reason is not None:
            raise Stopped(f"{reason}: saved epoch {epoch + 1} step {state.step_in_epoch} "
                          f"({checkpoint.tag_for(epoch, state.result.steps)}); run the same command to resume")

    def _save(self, engine: Engine, plan: FitPlan, state: FitState, epoch: int) -> None:
        """Tags `p<epoch>-s<step>`: the save after an epoch's evaluation counts as the next epoch's start,
        so it never takes the name of a save at the same step before the evaluation."""
        state.result.seconds = time.perf_counter() - self._started
        tag = checkpoint.tag_for(epoch, state.result.steps)
        position = checkpoint.Position(epoch, state.result.steps, tag, False, self.dist.world_size)
        checkpoint.save(engine, plan.ckpt_dir, position, state.client(), self.dist, keep=1)

    def _resume(self, engine: Engine, plan: FitPlan, name: str) -> FitState:
        position = checkpoint.resume_point(plan.ckpt_dir, self.dist, self.log) if plan.ckpt_dir else None
        if position is None:
            return FitState()
        if position.resharded(self.dist.world_size):
            raise StageInputError(f"{plan.ckpt_dir}: saved by {position.world_size} rank(s), this run has "
                                  f"{self.dist.world_size}: rerun on {position.world_size}, or remove "
                                  f"{plan.ckpt_dir} to start this fine-tuning over")
        state = FitState.from_client(engine.load(plan.ckpt_dir, position.tag))
        checkpoint.restore_rank_state(engine, plan.ckpt_dir, position.tag, self.dist)
        self.log.info(f"{name}: resumed at epoch {state.epoch + 1} step {state.step_in_epoch} from {position.tag}")
        return state

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
