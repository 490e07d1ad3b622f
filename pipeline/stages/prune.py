"""prune: the search's ticket -> a structurally smaller BERT (weights + pruning plan).

The weights pruned are the ones retraining starts from (`retrain.rewind`): the weights before
the search (default, EarlyBERT's rewinding) or those at its end, with the kept gates' values
multiplied into the weights so the pruned model computes what the gated one did.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from pipeline.model.bert import count_parameters
from pipeline.model.gates import SlimmingGates
from pipeline.model.prune import fold_gates, load_pruned, plan_summary, prune_model, save_pruned
from pipeline.runner import StageContext, StageResult

MODEL = "model"


def run(ctx: StageContext) -> StageResult:
    search = ctx.input_dir("search")
    plan = json.loads((search / "masks.json").read_text())["plan"]
    rewind = ctx.cfg.retrain.rewind == "search_start"
    source = search / ("rewind" if rewind else "end")
    hf = load_pruned(source)
    dense_params = count_parameters(hf)
    if not rewind:
        saved = torch.load(source / "gates.pt")
        gates = SlimmingGates(*saved["heads"].shape, saved["ffn"].shape[1])
        gates.heads.data.copy_(saved["heads"])
        gates.ffn.data.copy_(saved["ffn"])
        fold_gates(hf, gates)
    prune_model(hf, plan)
    out = ctx.stage_dir / MODEL
    if ctx.dist.is_main:
        tmp = ctx.stage_dir / f".{MODEL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pruned(hf, plan, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    ctx.dist.barrier()
    metrics = {"weights": "before search" if rewind else "search end", "parameters_dense": dense_params,
               "parameters_pruned": count_parameters(hf), **plan_summary(plan, hf.config)}
    ctx.log.info(f"pruned: {metrics['heads_kept']}/{metrics['heads_total']} heads, {metrics['ffn_kept']}/"
                 f"{metrics['ffn_total']} FFN neurons, {dense_params / 1e6:.2f}M -> "
                 f"{metrics['parameters_pruned'] / 1e6:.2f}M parameters")
    return StageResult(outputs=sorted(p for p in out.iterdir() if p.is_file()), metrics=metrics)
