"""retrain: pretraining of the pruned model through the unchanged pretrain path.

The same loop, optimizer, phases, checkpoints and resume as pretrain; only the model comes from
the prune stage (rebuilt from its plan). Fresh optimizer, no gates, no L1. The export carries the
plan so finetune can rebuild the pruned shapes.
"""

from __future__ import annotations

import shutil

from pipeline.model.bert import PretrainObjective, count_parameters, train_flops_per_token
from pipeline.model.prune import PLAN, load_pruned
from pipeline.runner import StageContext, StageResult
from pipeline.stages.pretrain import checked_tokenizer, export_model
from pipeline.train import Trainer


def _pruned_flops(hf, seq_len: int, mask_fraction: float, sparse: bool) -> float:
    """FLOPs per token of the pruned shapes: the dense formula scaled by the kept weight share."""
    dense = train_flops_per_token(hf.config, seq_len, mask_fraction, sparse)
    layers = hf.bert.encoder.layer
    full = hf.config.num_hidden_layers * (4 * hf.config.hidden_size ** 2 + 2 * hf.config.hidden_size *
                                          hf.config.intermediate_size)
    kept = sum(layer.attention.output.dense.in_features * hf.config.hidden_size * 4
               + 2 * layer.intermediate.dense.out_features * hf.config.hidden_size for layer in layers)
    return dense - 6.0 * (full - kept)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    prepare_dir = ctx.input_dir("prepare")
    manifest, info = checked_tokenizer(prepare_dir)
    hf = load_pruned(ctx.input_dir("prune") / "model")
    objective = PretrainObjective(hf, sparse=cfg.model.sparse_mlm_head)
    trainer = Trainer(ctx, objective, prepare_dir,
                      lambda n: _pruned_flops(hf, n, cfg.data.masking.probability, cfg.model.sparse_mlm_head))
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
    import json
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
