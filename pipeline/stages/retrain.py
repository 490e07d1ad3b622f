"""retrain: pretraining of the pruned model through the unchanged pretrain path.

The same loop, optimizer, phases, checkpoints and resume as pretrain; only the model comes from
the prune stage (rebuilt from its plan). Fresh optimizer, no gates, no L1. The export carries the
plan so finetune can rebuild the pruned shapes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

from pipeline.errors import ConfigError
from pipeline.model.bert import PretrainObjective, count_parameters, layer_widths, train_flops_per_token
from pipeline.model.prune import PLAN, load_pruned
from pipeline.runner import StageContext, StageResult
from pipeline.stages.pretrain import checked_tokenizer, export_model
from pipeline.train import PhasePlan, Trainer, plan_phases


def budget_plans(cfg, world_size: int, search_steps: int) -> list[PhasePlan]:
    """The pretrain phases cut to `retrain.fraction` / `retrain.steps`; with `continue_search`, phase 0
    also leaves out the steps the search trained and enters its schedule where they end."""
    plans, r = plan_phases(cfg, world_size), cfg.retrain
    if r.steps is not None and len(r.steps) != len(plans):
        raise ConfigError(f"retrain.steps: {len(r.steps)} entries for {len(plans)} pretrain phases")
    budgeted = []
    for plan in plans:
        steps = r.steps[plan.index] if r.steps is not None else max(1, round(r.fraction * plan.steps))
        start = min(search_steps, steps - 1) if r.continue_search and plan.index == 0 else 0
        budgeted.append(dataclasses.replace(plan, steps=steps - start, schedule_start=start))
    return budgeted


def _search_steps(ctx: StageContext) -> int:
    if not ctx.cfg.retrain.continue_search:
        return 0
    record = json.loads((ctx.input_dir("search") / "stage.json").read_text())
    return int(record["metrics"]["trained_steps"])


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    prepare_dir = ctx.input_dir("prepare")
    manifest, info = checked_tokenizer(prepare_dir)
    hf = load_pruned(ctx.input_dir("prune") / "model")
    objective = PretrainObjective(hf, sparse=cfg.model.sparse_mlm_head)
    trainer = Trainer(ctx, objective, prepare_dir,
                      lambda n: train_flops_per_token(hf.config, n, cfg.data.masking.probability,
                                                      cfg.model.sparse_mlm_head, layer_widths(hf)),
                      plans=budget_plans(cfg, ctx.dist.world_size, _search_steps(ctx)))
    summary = trainer.run()
    outputs = export_model(ctx, trainer.engine.module.hf, prepare_dir / "tokenizer")
    if ctx.dist.is_main:
        shutil.copy(ctx.input_dir("prune") / "model" / PLAN, ctx.stage_dir / "export" / PLAN)
    ctx.dist.barrier()
    metrics = {"parameters": count_parameters(objective)}
    for phase, values in summary.items():
        metrics.update({f"{phase}_{k}": v for k, v in values.items()})
    metrics.update(_throughput(ctx))
    return StageResult(outputs=outputs + [ctx.stage_dir / "export" / PLAN], metrics=metrics)


def _throughput(ctx: StageContext) -> dict:
    """Median tokens/s of this run and, when the dense pretrain ran in the same run, of that one."""
    import statistics

    def median_tps(stage_dir) -> float | None:
        path = stage_dir / "metrics.jsonl"
        if not path.exists():
            return None
        values = [json.loads(line).get("tokens_per_s") for line in path.read_text().splitlines()]
        values = [v for v in values if v]
        return statistics.median(values) if values else None

    out = {"tokens_per_s": median_tps(ctx.stage_dir)}
    dense = median_tps(ctx.run_dir.stage_dir("pretrain"))
    if dense:
        out["dense_tokens_per_s"] = dense
        out["speedup_vs_dense"] = out["tokens_per_s"] / dense if out["tokens_per_s"] else None
    return out
