"""The training loop shared by pretrain, search and retrain: phases, checkpoints, exact resume, metrics.

A run is a list of phases (e.g. seq 128 then seq 512). Each phase gets its own DeepSpeed
engine (its own batch sizes), optimizer, schedule and data loader; phase k+1 starts from
phase k's final weights. Everything a phase needs to continue exactly is in its checkpoints,
so rerunning the same command after a kill -9 resumes from the newest complete checkpoint
and, on CPU with the same settings, ends with bit-identical weights.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist

from pipeline import checkpoint
from pipeline.config import RunConfig
from pipeline.console import progress
from pipeline.data.loader import PretrainLoader, ShardSet
from pipeline.data.masking import IGNORE
from pipeline.data.verify import verify_shards
from pipeline.engine import BatchPlan, Engine, ds_config, save_ds_config
from pipeline.errors import ConfigError, StageInputError, Stopped
from pipeline.metrics import MetricsLog, StepStats
from pipeline.optim.build import build_optimizer
from pipeline.optim.schedule import warmup_poly


@dataclass(frozen=True)
class PhasePlan:
    index: int
    seq_len: int
    steps: int
    batch: BatchPlan
    lr: float
    freeze_step: int  # 1-bit optimizers: every phase has a fresh optimizer, so its own warmup
    warmup: float  # fraction of the phase's schedule spent warming up
    schedule_start: int = 0  # steps of this phase's schedule trained elsewhere (retrain continuing a search)


@dataclass
class TrainHooks:
    """What search adds to plain pretraining, without the loop knowing about gates."""

    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None  # e.g. L1 on slimming gates
    after_step: Callable[[int, int], bool] | None = None  # (phase, step) -> stop now


@dataclass
class PhaseState:
    step: int = 0
    tokens: int = 0
    samples: int = 0
    history: dict = field(default_factory=dict)


def plan_phases(cfg: RunConfig, world_size: int) -> list[PhasePlan]:
    if not cfg.pretrain.phases:
        raise ConfigError("pretrain.phases: at least one phase is needed")
    plans = []
    for i, phase in enumerate(cfg.pretrain.phases):
        per_step = phase.micro_batch_size * world_size
        if phase.global_batch_size % per_step:
            raise ConfigError(f"pretrain.phases.{i}.global_batch_size: {phase.global_batch_size} is not a multiple "
                              f"of micro_batch_size x ranks = {phase.micro_batch_size} x {world_size}")
        if phase.seq_len not in cfg.data.seq_lengths:
            raise ConfigError(f"pretrain.phases.{i}.seq_len: {phase.seq_len} is not among data.seq_lengths "
                              f"{cfg.data.seq_lengths} that prepare wrote")
        batch = BatchPlan(phase.micro_batch_size, phase.global_batch_size // per_step, world_size,
                          cfg.pretrain.precision, cfg.pretrain.grad_clip)
        freeze = cfg.optimizer.freeze_step if phase.freeze_step is None else phase.freeze_step
        warmup = cfg.schedule.warmup if phase.warmup is None else phase.warmup
        plans.append(PhasePlan(i, phase.seq_len, phase.steps, batch, phase.lr or cfg.optimizer.lr, freeze, warmup))
    return plans


class Trainer:
    def __init__(self, ctx, objective: torch.nn.Module, prepare_dir: Path, flops_per_token: Callable[[int], float],
                 hooks: TrainHooks | None = None, ds_config_path: Path | None = None, cfg: RunConfig | None = None,
                 plans: list[PhasePlan] | None = None):
        self.ctx, self.cfg, self.dist = ctx, cfg or ctx.cfg, ctx.dist  # cfg: e.g. search's own phase
        self.objective, self.prepare_dir, self.flops_per_token = objective, prepare_dir, flops_per_token
        self.hooks = hooks or TrainHooks()
        self.ds_config_path = ds_config_path or self.cfg.distributed.ds_config
        self.ckpt_dir = ctx.stage_dir / "checkpoints"
        self.plans = plans or plan_phases(self.cfg, self.dist.world_size)  # plans: e.g. retrain's budget
        self._comm_at_log: dict[int, int] = {}  # engine -> bytes sent at the last log line

    def run(self) -> dict:
        """Train every phase not finished yet; return a summary per phase. Leaves the final weights loaded."""
        stop = self.ctx.stop
        if stop is None:
            return self._run()
        stop.listening = True  # a signal now waits for the step boundary
        try:
            return self._run()
        finally:
            stop.listening = False

    def _run(self) -> dict:
        self._verify_data()
        position = checkpoint.resume_point(self.ckpt_dir, self.dist, self.ctx.log)
        metrics = MetricsLog(self.ctx.stage_dir / "metrics.jsonl", self.dist.is_main)
        metrics.truncate_after(position)
        summary, engine = {}, None
        for plan in self.plans:
            if position and (position.phase > plan.index or (position.phase == plan.index and position.phase_done)):
                summary[f"phase{plan.index}"] = checkpoint.phase_summary(self.ckpt_dir, plan.index)
                continue
            engine, summary[f"phase{plan.index}"] = self._run_phase(plan, position, metrics)
            position = checkpoint.latest(self.ckpt_dir)
        if engine is None:  # everything was done by an earlier run: load the final weights
            engine = self._engine(self.plans[-1])
            engine.load(self.ckpt_dir, position.tag, module_only=True)
        self.engine = engine
        return summary

    def _verify_data(self) -> None:
        """Rank 0 checks the shards this run reads against the manifest; every rank stops if one is bad."""
        problem = None
        if self.dist.is_main:
            try:
                verify_shards(self.prepare_dir, sorted({p.seq_len for p in self.plans}), self.ctx.log)
            except StageInputError as exc:
                problem = str(exc)
        problem = self.dist.broadcast_object(problem)
        if problem:
            raise StageInputError(problem)

    def _engine(self, plan: PhasePlan, universal: bool = False) -> Engine:
        optimizer = build_optimizer(self.cfg.optimizer.model_copy(update={"freeze_step": plan.freeze_step}),
                                    self.objective, plan.lr)
        schedule = self.cfg.schedule.model_copy(update={"warmup": plan.warmup})
        scheduler = warmup_poly(optimizer, plan.schedule_start + plan.steps, schedule, plan.schedule_start)
        tb = self.ctx.stage_dir / "tensorboard"
        cfg = ds_config(Path(self.ds_config_path), plan.batch, tensorboard_dir=tb, job_name=f"phase{plan.index}",
                        compressed=self.cfg.optimizer.name.startswith("onebit"))
        if universal:  # resuming partitions saved by another number of ranks
            cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
        if self.dist.is_main:
            save_ds_config(cfg, self.ctx.stage_dir / f"ds_config.phase{plan.index}.json")
        return Engine(self.objective, optimizer, scheduler, cfg, self.dist)

    def _loaders(self, plan: PhasePlan) -> tuple[PretrainLoader, list[dict]]:
        seed, masking = self.cfg.run.seed, self.cfg.data.masking
        train = PretrainLoader(ShardSet(self.prepare_dir, plan.seq_len, "train"), plan.batch.micro_batch, masking,
                               seed + 7919 * plan.index, self.dist.rank, self.dist.world_size)
        if self.cfg.data.validation_fraction == 0:  # evaluation explicitly off
            return train, []
        try:  # a missing, damaged or too small validation split is an error, not a run without evaluation
            valid = PretrainLoader(ShardSet(self.prepare_dir, plan.seq_len, "valid"), plan.batch.micro_batch,
                                   masking, seed, self.dist.rank, self.dist.world_size, shuffle=False)
        except StageInputError as exc:
            raise StageInputError(f"validation split: {exc} (data.validation_fraction: 0 trains without "
                                  "evaluation)") from None
        n = min(self.cfg.pretrain.eval_batches, valid.batches_per_epoch)
        return train, [_with_mask_only_labels(valid.make_batch(0, i), valid.shards.info.mask_id) for i in range(n)]

    def _run_phase(self, plan: PhasePlan, position, metrics: MetricsLog) -> tuple[Engine, dict]:
        resharded = bool(position and position.phase == plan.index and position.resharded(self.dist.world_size))
        engine = self.engine = self._engine(plan, universal=resharded)  # hooks may read it (gates' masters)
        loader, eval_batches = self._loaders(plan)
        state = self._resume(engine, loader, plan, position)
        log_every, eval_every = self.cfg.pretrain.log_every, self.cfg.pretrain.eval_every
        stats = StepStats()
        # training mode set here, not left to the evaluation: a model from `from_pretrained` (init_from, the
        # pruned model of retrain) comes back in eval mode, and a resumed phase skips the first evaluation
        engine.module.train()
        if state.step == 0 and eval_batches:
            state.history.update({f"initial_{k}": v for k, v in self._evaluate(engine, eval_batches).items()})
        with progress(self.dist.rank) as bar:
            task = bar.add_task(f"phase {plan.index} (seq {plan.seq_len})", total=plan.steps, completed=state.step)
            stop = False
            while state.step < plan.steps and not stop:
                stats.add(self._train_step(engine, loader, plan))
                state.step += 1
                state.samples += plan.batch.global_batch
                state.tokens += plan.batch.global_batch * plan.seq_len
                stop = bool(self.hooks.after_step and self.hooks.after_step(plan.index, state.step))
                last = state.step == plan.steps or stop
                record = {"phase": plan.index, "step": state.step}
                if state.step % log_every == 0 or last:
                    record.update(self._log_record(engine, plan, state, stats.flush(self.dist)))
                if eval_batches and (state.step % eval_every == 0 or last):
                    scores = self._evaluate(engine, eval_batches)
                    record.update(scores, eval_ppl=float(torch.exp(torch.tensor(min(scores["eval_loss"], 50.0)))))
                    state.history.update({f"final_{k}": v for k, v in scores.items()})
                if len(record) > 2:
                    metrics.write(record)
                    self._log_line(record, plan)
                    engine.log_events([(f"train/{k}", v, state.step) for k, v in record.items()
                                       if isinstance(v, float)])
                    bar.update(task, description=f"phase {plan.index} loss {record.get('loss', 0):.3f}")
                if last and self.dist.is_main:  # before the checkpoint that marks the phase done
                    checkpoint.save_phase_summary(self.ckpt_dir, plan.index, self._phase_summary(plan, state))
                if state.step % self.cfg.pretrain.checkpoint_every == 0 or last:
                    self._save(engine, loader, plan, state, phase_done=last)
                if "eval_loss" in record or state.step % self.cfg.pretrain.checkpoint_every == 0:
                    stats.restart_clock()
                bar.update(task, completed=state.step)
                self._stop_if_asked(engine, loader, plan, state, last)
        loader.close()
        return engine, self._phase_summary(plan, state)

    def _stop_if_asked(self, engine: Engine, loader: PretrainLoader, plan: PhasePlan, state: PhaseState,
                       last: bool) -> None:
        """All ranks agree on a stop (signal or deadline) after this step: save it, then leave."""
        stop = self.ctx.stop
        reason = stop.agreed(self.dist.world_size) if stop is not None else None
        if reason is None:
            return
        if state.step % self.cfg.pretrain.checkpoint_every and not last:  # else just saved
            self._save(engine, loader, plan, state, phase_done=False)
        loader.close()
        raise Stopped(f"{reason}: saved phase {plan.index} step {state.step} "
                      f"({checkpoint.tag_for(plan.index, state.step)}); run the same command to resume")

    def _phase_summary(self, plan: PhasePlan, state: PhaseState) -> dict:
        return {"steps": state.step, "tokens": state.tokens, "flops": self.flops_per_token(plan.seq_len) * state.tokens,
                **state.history}

    def _log_line(self, record: dict, plan: PhasePlan) -> None:
        if sys.stderr.isatty():
            return  # the progress bar shows it
        parts = [f"phase {plan.index} step {record['step']}/{plan.steps}"]
        for key, fmt in (("loss", ".4f"), ("mlm_acc", ".3f"), ("lr", ".2e"), ("tokens_per_s", ",.0f"),
                         ("mfu", ".3f"), ("eval_loss", ".4f"), ("eval_acc", ".3f"),
                         ("eval_loss_at_mask", ".4f")):
            if record.get(key) is not None:
                parts.append(f"{key} {record[key]:{fmt}}")
        self.ctx.log.info("  ".join(parts))

    def _train_step(self, engine: Engine, loader: PretrainLoader, plan: PhasePlan) -> dict:
        sums = torch.zeros(4, device=engine.device)  # loss, masked-weighted mlm loss, correct, masked
        digest = 0
        for _ in range(plan.batch.grad_accum):
            batch = next(loader)
            digest = zlib.crc32(batch.pop("rows").numpy().tobytes(), digest)
            out = engine(**batch)
            loss = out.loss
            if self.hooks.extra_loss is not None:
                loss = loss + self.hooks.extra_loss(engine.module)
            engine.backward(loss)
            engine.step()
            sums += torch.stack([loss.detach().float(), out.mlm_loss.float() * out.masked, out.correct.float(),
                                 out.masked.float()])
        return {"sums": sums, "rows_digest": digest, "micro": plan.batch.grad_accum}

    def _log_record(self, engine: Engine, plan: PhasePlan, state: PhaseState, stats: dict) -> dict:
        tokens_per_s = plan.batch.global_batch * plan.seq_len / max(stats["seconds_per_step"], 1e-9)
        flops = self.flops_per_token(plan.seq_len) * tokens_per_s
        peak = self.cfg.pretrain.peak_tflops * 1e12 * self.dist.world_size
        sent = engine.comm_bytes()
        comm = (sent - self._comm_at_log.get(id(engine), 0)) / max(stats["steps"], 1)
        self._comm_at_log = {id(engine): sent}
        return {"phase": plan.index, "step": state.step, "loss": stats["loss"], "mlm_loss": stats["mlm_loss"],
                "comm_bytes_per_step": comm,
                "mlm_acc": stats["mlm_acc"], "lr": engine.lr(), "grad_norm": engine.grad_norm(),
                "nonfinite_grad_steps": engine.nonfinite_steps(),
                "tokens_per_s": tokens_per_s, "samples_per_s": tokens_per_s / plan.seq_len, "mfu": flops / peak,
                "tokens": state.tokens, "rows_digest": stats["rows_digest"], "time": time.time()}

    @torch.no_grad()
    def _evaluate(self, engine: Engine, batches: list[dict]) -> dict:
        """Validation MLM loss (nats per masked token) and accuracy over the fixed evaluation batches, and
        the loss at the positions whose input is [MASK]: the 10% left unchanged can be copied from the input,
        so only this part says how much the model predicts from context."""
        engine.module.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        for batch in batches:
            at_mask = batch["mask_only_labels"] != IGNORE
            batch = {k: v for k, v in batch.items() if k not in ("rows", "mask_only_labels")}
            out = engine(**batch, at_mask=at_mask)  # one forward: both losses from the same logits
            sums += torch.tensor([float(out.mlm_loss) * float(out.masked), float(out.correct), float(out.masked),
                                  float(out.at_mask_loss_sum), float(out.at_mask)], dtype=torch.float64)
        engine.module.train()
        if self.dist.world_size > 1:
            tdist.all_reduce(sums)
        masked, at_mask = sums[2].clamp(min=1), sums[4].clamp(min=1)
        return {"eval_loss": float(sums[0] / masked), "eval_acc": float(sums[1] / masked),
                "eval_loss_at_mask": float(sums[3] / at_mask)}

    def _resume(self, engine: Engine, loader: PretrainLoader, plan: PhasePlan, position) -> PhaseState:
        if position is None:
            torch.manual_seed(self.cfg.run.seed * 1000 + self.dist.rank)  # dropout differs per rank
            return PhaseState()
        if position.phase == plan.index and position.resharded(self.dist.world_size):
            return self._resume_resharded(engine, loader, plan, position)
        if position.phase == plan.index:
            client = engine.load(self.ckpt_dir, position.tag)
            loader.load_state_dict(client["loader"])
            checkpoint.restore_rank_state(engine, self.ckpt_dir, position.tag, self.dist)
            self.ctx.log.info(f"resumed phase {plan.index} at step {position.step} from {position.tag}")
            return PhaseState(**client["train"])
        engine.load(self.ckpt_dir, position.tag, module_only=True)  # the previous phase's final weights
        torch.manual_seed(self.cfg.run.seed * 1000 + 100 * plan.index + self.dist.rank)
        self.ctx.log.info(f"phase {plan.index} starts from the weights of {position.tag}")
        return PhaseState()

    def _resume_resharded(self, engine: Engine, loader: PretrainLoader, plan: PhasePlan, position) -> PhaseState:
        """A checkpoint saved by another number of ranks (allocations change between jobs): the same model,
        optimizer and schedule state; the data order continues with no row skipped or repeated. Not
        bit-identical to a run on one layout: dropout and masks are drawn afresh per rank, and 1-bit error
        feedback (per rank) restarts from zero."""
        directory, tag = checkpoint.universal(self.ckpt_dir, position, self.dist, Engine.to_universal, self.ctx.log)
        client = engine.load(directory, tag)
        loader.load_state_dict(client["loader"])
        torch.manual_seed(self.cfg.run.seed * 1000 + 100 * plan.index + 10 * position.step + self.dist.rank)
        self.ctx.log.warning(f"resumed phase {plan.index} at step {position.step} from {position.tag}, saved by "
                             f"{position.world_size} rank(s), on {self.dist.world_size}")
        return PhaseState(**client["train"])

    def _save(self, engine: Engine, loader: PretrainLoader, plan: PhasePlan, state: PhaseState,
              phase_done: bool) -> None:
        position = checkpoint.Position(plan.index, state.step, checkpoint.tag_for(plan.index, state.step), phase_done,
                                       self.dist.world_size)
        client = {"loader": loader.state_dict(), "train": state.__dict__, "phase": plan.index}
        checkpoint.save(engine, self.ckpt_dir, position, client, self.dist, self.cfg.pretrain.keep_last)


def _with_mask_only_labels(batch: dict, mask_id: int) -> dict:
    """The batch, plus its labels kept only where the input is [MASK] (for the evaluation's context loss)."""
    at_mask = torch.where(batch["input_ids"] == mask_id, batch["labels"], torch.full_like(batch["labels"], IGNORE))
    return {**batch, "mask_only_labels": at_mask}
