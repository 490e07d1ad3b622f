"""Trains a tiny BERT for N steps on fixed batches under a given ZeRO stage; rank 0 saves the weights.

Run by test_lamb.py under 1 or 2 ranks: the global batch is the same 8 sequences either way,
split into micro-batches of 4 (1 rank: 2 accumulation steps; 2 ranks: one each). Given a
checkpoint folder and a step, it saves there at that step and stops, or, finding the checkpoint,
resumes from it (on whatever number of ranks it now runs) and trains to the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from pipeline import checkpoint
from pipeline.config import ModelConfig
from pipeline.dist import Dist, detect
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.model.bert import PretrainObjective, bert_config, build_model
from pipeline.optim.groups import param_groups
from pipeline.optim.lamb import Lamb

VOCAB, SEQ, MICRO, GLOBAL = 300, 32, 4, 8


def batches(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(5, VOCAB, (GLOBAL, SEQ), generator=gen)
    labels = torch.where(torch.rand(GLOBAL, SEQ, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    return ids, labels


def main(zero: int, steps: int, naive: bool, out: Path, ckpt: Path | None = None, split: int = 0) -> None:
    dist = Dist(detect(os.environ))
    torch.manual_seed(0)
    model = build_model(bert_config(ModelConfig(preset="tiny", dropout=0.0), VOCAB), pairs=False)
    objective = PretrainObjective(model, sparse=True)
    optimizer = Lamb(param_groups(objective, 0.01), lr=2e-2, per_tensor=not naive)
    ds_json = out.parent / f"ds_zero{zero}.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True}))
    accum = GLOBAL // (MICRO * dist.world_size)
    cfg = ds_config(ds_json, BatchPlan(MICRO, accum, dist.world_size, "fp32", 1.0))
    position = checkpoint.latest(ckpt) if ckpt else None
    if position is not None and position.resharded(dist.world_size):
        cfg["checkpoint"] = {"load_universal": True}
    engine = Engine(objective, optimizer, None, cfg, dist)
    first, last = 0, steps
    if position is not None:  # the second job
        if position.resharded(dist.world_size):
            where = checkpoint.universal(ckpt, position, dist, Engine.to_universal, logging.getLogger("worker"))
        else:
            where = (ckpt, position.tag)
        first = engine.load(*where)["step"]
    elif ckpt is not None:  # the first job: stop at `split`
        last = split
    for step in range(first, last):
        ids, labels = batches(step)
        for micro in range(accum):
            start = (dist.rank * accum + micro) * MICRO
            sl = slice(start, start + MICRO)
            out_ = engine(input_ids=ids[sl], attention_mask=torch.ones_like(ids[sl]),
                          token_type_ids=torch.zeros_like(ids[sl]), labels=labels[sl])
            engine.backward(out_.loss)
            engine.step()
    if ckpt is not None and position is None:
        tag = checkpoint.tag_for(0, last)
        checkpoint.save(engine, ckpt, checkpoint.Position(0, last, tag, False, dist.world_size), {"step": last},
                        dist, keep=1)
    if dist.is_main:
        torch.save({k: v.detach().float().clone() for k, v in engine.module.hf.state_dict().items()}, out)
    dist.barrier()
    dist.shutdown()  # leaving with gloo threads alive can abort the process at exit


if __name__ == "__main__":
    resume = (Path(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 5 else ()
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "naive", Path(sys.argv[4]), *resume)
