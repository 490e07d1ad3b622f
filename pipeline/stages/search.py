"""search: EarlyBERT in pretraining — train with slimming gates and L1, stop when the early-bird ticket emerges.

  1. build the model exactly as pretrain does (same seed: the same starting point) and keep those
     weights (`rewind/`), which retrain starts from by default;
  2. attach the gates and train through the unchanged pretrain loop (DeepSpeed, LAMB, checkpoints),
     with L1 on the gates added to the loss, for at most `search.max_steps` of the first phase;
  3. every `check_every` steps draw masks from the gates; stop when the ticket emerges (FIFO rule),
     at `fixed_step` (EarlyBERT's fixed draw), or at the budget; `mode: random` draws a random
     ticket of the same size without training (the ablation baseline);
  4. write the masks (kept heads/neurons per layer), the distance history, the step of emergence,
     the coefficient snapshots, the weights at the end, and two plots.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import checkpoint
from pipeline.config import RunConfig, SearchConfig
from pipeline.earlybird import EarlyBirdDetector, random_masks, ticket_masks
from pipeline.model.bert import PretrainObjective, train_flops_per_token
from pipeline.model.gates import SlimmingGates, gates_for
from pipeline.model.init_from import checkpoint_fingerprint, starting_model
from pipeline.model.prune import plan_summary
from pipeline.report.search_plots import plot_search
from pipeline.rundir import atomic_write_json
from pipeline.runner import StageContext, StageResult
from pipeline.stages.pretrain import checked_tokenizer
from pipeline.train import Trainer, TrainHooks


def input_fingerprints(cfg: RunConfig) -> dict[str, str]:
    return checkpoint_fingerprint(cfg)


class TicketTracker:
    """The after-step hook: draws masks, keeps the FIFO, decides when to stop; survives resume."""

    def __init__(self, search: SearchConfig, gates: SlimmingGates, stage_dir: Path, is_main: bool,
                 read: Callable[[], list[torch.Tensor]] | None = None):
        self.s, self.gates, self.dir, self.is_main = search, gates, stage_dir, is_main
        # the gates' fp32 values: from the optimizer's masters when training in bf16/fp16 (see Engine)
        self.read = read or (lambda: [gates.heads.detach().float(), gates.ffn.detach().float()])
        self.detector = EarlyBirdDetector(self.s.fifo_size, self.s.head_distance_threshold,
                                          self.s.ffn_distance_threshold)
        self.steps: list[int] = []
        self.snapshots: list[dict] = []
        self.emerged_at: int | None = None

    def masks_of(self, snapshot: dict):
        return ticket_masks(self.s, snapshot["heads"], snapshot["ffn"])

    def restore(self, upto_step: int) -> None:
        """After a resume: replay the checks up to the checkpoint the trainer resumed from."""
        path = self.dir / "snapshots.pt"
        if not path.exists():
            return
        saved = torch.load(path)
        for step, snapshot in zip(saved["steps"], saved["snapshots"]):
            if step <= upto_step:
                self._record(step, snapshot)

    def after_step(self, phase: int, step: int) -> bool:
        if step % self.s.check_every and step != self.s.fixed_step:
            return False
        emerged = self.check(step)
        if self.s.mode == "fixed":
            return step >= (self.s.fixed_step or self.s.max_steps)
        return emerged

    def check(self, step: int) -> bool:
        """Draw masks from the gates as they are now; True when the ticket has emerged."""
        heads, ffn = self.read()
        snapshot = {"heads": heads.cpu().clone(), "ffn": ffn.cpu().clone()}
        emerged = self._record(step, snapshot)
        if self.is_main:
            tmp = self.dir / "snapshots.pt.tmp"
            torch.save({"steps": self.steps, "snapshots": self.snapshots}, tmp)
            os.replace(tmp, self.dir / "snapshots.pt")
        return emerged

    def _record(self, step: int, snapshot: dict) -> bool:
        self.steps.append(step)
        self.snapshots.append(snapshot)
        emerged = self.detector.push(self.masks_of(snapshot))
        if emerged and self.emerged_at is None:
            self.emerged_at = step
        return emerged


def search_config(cfg: RunConfig) -> RunConfig:
    """The search trains the first pretrain phase, for at most search.max_steps."""
    first = cfg.pretrain.phases[0].model_copy(update={"steps": cfg.search.max_steps})
    return cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"phases": [first]})})


def run(ctx: StageContext) -> StageResult:
    cfg, out = ctx.cfg, ctx.stage_dir
    prepare_dir = ctx.input_dir("prepare")
    manifest, info = checked_tokenizer(prepare_dir)
    config, hf = starting_model(cfg, info.vocab_size, info.pad_id, manifest["objective"] != "mlm",
                                prepare_dir / "tokenizer", ctx.log)  # the pretrain stage's starting point
    if ctx.dist.is_main and not (out / "rewind" / "model.safetensors").exists():
        _save_weights(hf, out / "rewind")
    s = cfg.search
    if s.mode == "random":
        masks = random_masks(s, (config.num_hidden_layers, config.num_attention_heads),
                             (config.num_hidden_layers, config.intermediate_size), cfg.run.seed)
        return _finish(ctx, masks.to_plan(), config, {"mode": "random", "trained_steps": 0, "emerged_at": None}, None)
    objective = PretrainObjective(hf, sparse=cfg.model.sparse_mlm_head)
    objective.gates = gates_for(hf)
    gates = objective.gates
    tracker = TicketTracker(cfg.search, gates, out, ctx.dist.is_main,
                            read=lambda: trainer.engine.fp32_values([gates.heads, gates.ffn]))
    hooks = TrainHooks(extra_loss=lambda module: module.gates.l1(s.l1_heads, s.l1_ffn), after_step=tracker.after_step)
    scfg = search_config(cfg)
    masking, sparse = cfg.data.masking.probability, cfg.model.sparse_mlm_head
    trainer = Trainer(ctx, objective, prepare_dir, lambda n: train_flops_per_token(config, n, masking, sparse), hooks,
                      cfg=scfg)
    position = checkpoint.resume_point(trainer.ckpt_dir, ctx.dist, ctx.log)
    tracker.restore(position.step if position else 0)
    summary = trainer.run()
    if not tracker.snapshots:  # stopped before the first check: draw from the gates as they are
        tracker.after_step(0, 0)
    final = tracker.masks_of(tracker.snapshots[-1])
    if ctx.dist.is_main:
        _save_weights(trainer.engine.module.hf, out / "end", gates=objective.gates)
    ctx.dist.barrier()
    trained = summary.get("phase0", {})
    info_ = {"mode": s.mode, "trained_steps": trained.get("steps", tracker.steps[-1]),
             "trained_flops": trained.get("flops", 0.0), "emerged_at": tracker.emerged_at, "budget": s.max_steps}
    return _finish(ctx, final.to_plan(), config, info_, tracker)


def _save_weights(hf: torch.nn.Module, directory: Path, gates: SlimmingGates | None = None) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.detach().float().cpu() for k, v in hf.state_dict().items()}
    hf.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    if gates is not None:
        torch.save({"heads": gates.heads.detach().float().cpu(), "ffn": gates.ffn.detach().float().cpu()},
                   tmp / "gates.pt")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _finish(ctx: StageContext, plan: dict, config, info: dict, tracker: TicketTracker | None) -> StageResult:
    out = ctx.stage_dir
    if ctx.dist.is_main:
        steps = tracker.steps if tracker else []
        heads = tracker.detector.head_history if tracker else []
        ffn = tracker.detector.ffn_history if tracker else []
        atomic_write_json(out / "history.json", {"steps": steps, "head_distances": heads, "ffn_distances": ffn,
                                                 **info})
        atomic_write_json(out / "masks.json", {"plan": plan, **info, **plan_summary(plan, config)})
        if tracker and tracker.snapshots:
            plot_search(tracker, out)
    ctx.dist.barrier()
    files = [out / "masks.json", out / "history.json", out / "rewind" / "model.safetensors"]
    files += [p for p in (out / "end").glob("*") if p.is_file()] + sorted(out.glob("*.png"))
    if (out / "snapshots.pt").exists():
        files.append(out / "snapshots.pt")
    return StageResult(outputs=files, metrics={**info, **plan_summary(plan, config)})
