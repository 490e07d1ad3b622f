"""ZeRO 0/1/2 x fp32/bf16 with gradient accumulation, in one process group; rank 0 writes what it saw."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from pipeline.config import ModelConfig
from pipeline.dist import Dist, detect
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.model.bert import PretrainObjective, bert_config, build_model
from pipeline.optim.groups import param_groups
from pipeline.optim.lamb import Lamb

VOCAB, SEQ, MICRO, ACCUM, STEPS = 300, 32, 4, 2, 4


def run(zero: int, precision: str, dist: Dist, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = PretrainObjective(build_model(bert_config(ModelConfig(preset="tiny", dropout=0.0), VOCAB), False))
    optimizer = Lamb(param_groups(model, 0.01), lr=5e-3)
    path = tmp / f"ds{zero}.json"
    if dist.is_main:
        path.write_text(json.dumps({"zero_optimization": {"stage": zero}}))
    dist.barrier()
    engine = Engine(model, optimizer, None, ds_config(path, BatchPlan(MICRO, ACCUM, dist.world_size, precision, 1.0)),
                    dist)
    gen = torch.Generator().manual_seed(42)
    ids = torch.randint(5, VOCAB, (MICRO * ACCUM * dist.world_size, SEQ), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    losses = []
    for _ in range(STEPS):  # the same batch every step: the loss must fall
        total = 0.0
        for micro in range(ACCUM):
            sl = slice((dist.rank * ACCUM + micro) * MICRO, (dist.rank * ACCUM + micro + 1) * MICRO)
            out = engine(input_ids=ids[sl], attention_mask=torch.ones_like(ids[sl]),
                         token_type_ids=torch.zeros_like(ids[sl]), labels=labels[sl])
            engine.backward(out.loss)
            engine.step()
            total += float(out.loss)
        losses.append(total / ACCUM)
    checksum = torch.tensor([sum(float(p.float().sum()) for p in engine.module.parameters())], dtype=torch.float64)
    sums = [torch.zeros_like(checksum) for _ in range(dist.world_size)]
    if dist.world_size > 1:
        tdist.all_gather(sums, checksum)
    else:
        sums = [checksum]
    return {"losses": losses, "checksums": [float(s) for s in sums], "optimizer": type(engine.optimizer).__name__}


def main(out: Path) -> None:
    dist = Dist(detect(os.environ))
    results = {f"zero{z}-{p}": run(z, p, dist, out.parent) for z in (0, 1, 2) for p in ("fp32", "bf16")}
    if dist.is_main:
        out.write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.shutdown()  # leaving with gloo threads alive can abort the process at exit


if __name__ == "__main__":
    main(Path(sys.argv[1]))
