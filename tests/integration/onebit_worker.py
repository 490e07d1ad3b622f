"""Multi-rank checks of the 1-bit path; rank 0 writes what every rank saw.

  compress: 200 calls of the compressed allreduce on rank-dependent inputs: outputs identical on
            all ranks, accumulated error bounded, bytes sent vs an fp32 all-reduce;
  adam/lamb: a tiny BERT trained with 1-bit Adam / 1-bit LAMB through the DeepSpeed engine (ZeRO-0,
            warmup 3 steps, then compressed): parameters bit-identical on every rank after every step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from pipeline.config import ModelConfig, OptimizerConfig
from pipeline.dist import Dist, detect
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.model.bert import PretrainObjective, bert_config, build_model
from pipeline.optim.build import build_optimizer
from pipeline.optim.compress import CompressedAllreduce

REPO = Path(__file__).resolve().parents[2]


def gathered(value: torch.Tensor, dist: Dist) -> list[float]:
    out = [torch.zeros_like(value) for _ in range(dist.world_size)]
    tdist.all_gather(out, value)
    return [float(v) for v in out]


def check_compress(dist: Dist) -> dict:
    n = 10_001  # not a multiple of 8 x ranks: padding is exercised
    comp = CompressedAllreduce(n)
    gen = torch.Generator().manual_seed(100 + dist.rank)
    drift = torch.zeros(n, dtype=torch.float64)
    identical = True
    for _ in range(200):
        x = torch.randn(n, generator=gen) * 0.1 + 0.02 * (dist.rank + 1)
        true = x.clone()
        tdist.all_reduce(true)
        true /= dist.world_size
        out = comp(x)
        checks = gathered(out.double().sum().reshape(1) + out.double().abs().sum(), dist)
        identical &= len(set(checks)) == 1
        drift += (out - true).double()
    return {"identical": identical, "drift": float(drift.norm()), "step_error_scale": float(true.norm()),
            "bytes_per_call": comp.bytes_sent / 200, "fp32_allreduce_bytes": 2 * (dist.world_size - 1) /
            dist.world_size * 4 * n}


def check_optimizer(dist: Dist, name: str) -> dict:
    torch.manual_seed(0)
    model = PretrainObjective(build_model(bert_config(ModelConfig(preset="tiny", dropout=0.0), 300), False))
    optimizer = build_optimizer(OptimizerConfig(name=name, lr=2e-3, freeze_step=3), model, 2e-3)
    cfg = ds_config(REPO / "ds_configs/pretrain_onebit_adam.json", BatchPlan(4, 1, dist.world_size, "fp32", 1.0),
                    compressed=True)
    engine = Engine(model, optimizer, None, cfg, dist)
    gen = torch.Generator().manual_seed(7 + dist.rank)  # every rank its own data
    identical, losses = True, []
    for _ in range(10):
        ids = torch.randint(5, 300, (4, 32), generator=gen)
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                     labels=labels)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
        checksum = torch.tensor([sum(float(p.double().sum()) for p in engine.module.parameters())], dtype=torch.float64)
        identical &= len(set(gathered(checksum, dist))) == 1
    return {"identical": identical, "losses": losses, "allreduce_on": engine.ds.enable_backward_allreduce,
            "compressing": optimizer.compressing, "bytes_sent": optimizer.bytes_sent}


def main(out: Path) -> None:
    dist = Dist(detect(os.environ))
    dist.init_process_group()
    result = {"compress": check_compress(dist), "adam": check_optimizer(dist, "onebit_adam"),
              "lamb": check_optimizer(dist, "onebit_lamb")}
    if dist.is_main:
        out.write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.shutdown()  # leaving with gloo threads alive can abort the process at exit


if __name__ == "__main__":
    main(Path(sys.argv[1]))
