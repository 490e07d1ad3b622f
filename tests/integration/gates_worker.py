"""Masks drawn from slimming gates trained in bf16 are the masks of their fp32 values.

For each DeepSpeed wrapper a bf16 run goes through (ZeRO-1's partitioned fp32 masters; the
fp16/bf16 wrapper of ZeRO stage 0), gate masters are set to values that differ from 1.0 by less
than bf16 can show, then read back as the search reads them. Rank 0 writes what it saw.
usage: torchrun --nproc_per_node N gates_worker.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from pipeline.config import ModelConfig, OptimizerConfig
from pipeline.dist import Dist, detect
from pipeline.earlybird import draw_masks
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.model.bert import PretrainObjective, bert_config, build_model
from pipeline.model.gates import gates_for
from pipeline.optim.build import build_optimizer

REPO = Path(__file__).resolve().parents[2]


def check(dist: Dist, ds_file: str) -> dict:
    torch.manual_seed(0)
    hf = build_model(bert_config(ModelConfig(preset="tiny", dropout=0.0, num_heads=8), 300), False)
    objective = PretrainObjective(hf)
    objective.gates = gates = gates_for(hf)
    optimizer = build_optimizer(OptimizerConfig(name="lamb", lr=1e-3), objective, 1e-3)
    engine = Engine(objective, optimizer, None, ds_config(REPO / "ds_configs" / ds_file,
                                                          BatchPlan(2, 1, dist.world_size, "bf16", 1.0)), dist)
    gen = torch.Generator().manual_seed(1)  # the same values on every rank
    heads = 1.0 + 1e-3 * torch.randperm(gates.heads.numel(), generator=gen).float().reshape(gates.heads.shape)
    ffn = 1.0 - 1e-5 * torch.randperm(gates.ffn.numel(), generator=gen).float().reshape(gates.ffn.shape)
    engine.set_fp32_value(gates.heads, heads)
    engine.set_fp32_value(gates.ffn, ffn)
    read_heads, read_ffn = engine.fp32_values([gates.heads, gates.ffn])
    expected = draw_masks(heads, ffn, 1 / 3, 0.4)
    from_masters = draw_masks(read_heads, read_ffn, 1 / 3, 0.4)
    from_module = draw_masks(gates.heads.detach().float(), gates.ffn.detach().float(), 1 / 3, 0.4)
    return {"module_dtype": str(gates.heads.dtype), "wrapper": type(engine.ds.optimizer).__name__,
            "masters_exact": bool(torch.equal(read_heads.cpu(), heads) and torch.equal(read_ffn.cpu(), ffn)),
            "masks_equal_fp32": bool(torch.equal(from_masters.heads, expected.heads)
                                     and torch.equal(from_masters.ffn, expected.ffn)),
            "module_masks_equal_fp32": bool(torch.equal(from_module.heads, expected.heads)
                                            and torch.equal(from_module.ffn, expected.ffn))}


def main(out: Path) -> None:
    dist = Dist(detect(os.environ))
    dist.init_process_group()
    result = {ds: check(dist, ds) for ds in ("cpu_demo.json", "pretrain_onebit_adam.json")}
    if dist.is_main:
        out.write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
