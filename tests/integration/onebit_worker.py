"""Multi-rank checks of the 1-bit path and of collectives that every rank must enter; rank 0 writes the results.

  compress:  200 calls of the compressed allreduce on rank-dependent inputs: outputs identical on all
             ranks, accumulated error bounded, frozen elements exactly 0, bytes handed to the collectives;
  warmup:    1-bit Adam / 1-bit LAMB before their freeze against AdamW / LAMB through the DeepSpeed engine,
             fp32 and under DeepSpeed's bf16 wrapper: the fp32 weights after 6 steps, relative difference;
  idle_rank: the last rank's batches have no masked token (its local gradients are exactly zero) through
             the freeze and compressed steps: the job finishes and every rank holds the same weights;
  zero_partition: LAMB under ZeRO-2 where the last rank's partition holds only a never-used tensor
             (its gradients are all zero): the job finishes (before, that rank skipped an all-reduce).
usage: torchrun --nproc_per_node N onebit_worker.py OUT.json
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
from pipeline.optim.compress import CompressedAllreduce, bytes_per_call

REPO = Path(__file__).resolve().parents[2]
VOCAB = 300


def gathered(value: torch.Tensor) -> list[float]:
    out = [torch.zeros_like(value) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, value)
    return [float(v) for v in out]


def check_compress(dist: Dist) -> dict:
    n = 10_001  # not a multiple of 8 x ranks: padding is exercised
    comp = CompressedAllreduce(n)
    frozen = torch.zeros(comp.padded, dtype=torch.bool)
    frozen[n:] = True  # the padding
    frozen[:500] = True  # and elements that never change
    gen = torch.Generator().manual_seed(100 + dist.rank)
    drift = torch.zeros(n, dtype=torch.float64)
    identical, zeros_kept = True, True
    for _ in range(200):
        x = torch.randn(n, generator=gen) * 0.1 + 0.02 * (dist.rank + 1)
        x[:500] = 0.0
        true = x.clone()
        tdist.all_reduce(true)
        true /= dist.world_size
        buf = torch.zeros(comp.padded)
        buf[:n] = x
        out = comp(buf, frozen=frozen)[:n]
        zeros_kept &= bool((out[:500] == 0).all())
        identical &= len(set(gathered(out.double().sum().reshape(1) + out.double().abs().sum()))) == 1
        drift += (out - true).double()
    return {"identical": identical, "zeros_kept": zeros_kept, "drift": float(drift.norm()),
            "step_error_scale": float(true.norm()), "bytes_per_call": comp.bytes_sent / 200,
            "fp32_allreduce_bytes": 2 * (dist.world_size - 1) / dist.world_size * 4 * n,
            "predicted_bytes_per_call": bytes_per_call(n, dist.world_size)}


def train(dist: Dist, optimizer_cfg: OptimizerConfig, precision: str, steps: int, idle_last_rank: bool = False):
    torch.manual_seed(0)
    model = PretrainObjective(build_model(bert_config(ModelConfig(preset="tiny", dropout=0.0), VOCAB), False))
    optimizer = build_optimizer(optimizer_cfg, model, optimizer_cfg.lr)
    cfg = ds_config(REPO / "ds_configs/pretrain_onebit_adam.json", BatchPlan(4, 1, dist.world_size, precision, 1.0),
                    compressed=True)
    engine = Engine(model, optimizer, None, cfg, dist)
    gen = torch.Generator().manual_seed(7 + dist.rank)  # every rank its own data, the same in every run
    losses = []
    for _ in range(steps):
        ids = torch.randint(5, VOCAB, (4, 32), generator=gen)
        chosen = torch.rand(ids.shape, generator=gen) < 0.3
        if idle_last_rank and dist.rank == dist.world_size - 1:
            chosen[:] = False
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                     labels=labels)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
    masters = [p.detach().float().clone() for g in engine.client_optimizer.param_groups for p in g["params"]]
    return engine, masters, losses


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.double() - y.double()).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.double().norm() ** 2) for y in b) ** 0.5


def check_warmup(dist: Dist, precision: str) -> dict:
    """Before the freeze, each 1-bit optimizer is its full-precision one."""
    out = {}
    for onebit, reference, lr in (("onebit_adam", "adamw", 2e-3), ("onebit_lamb", "lamb", 5e-3)):
        _, a, _ = train(dist, OptimizerConfig(name=onebit, lr=lr, freeze_step=1000), precision, 6)
        _, b, _ = train(dist, OptimizerConfig(name=reference, lr=lr), precision, 6)
        _, start, _ = train(dist, OptimizerConfig(name=reference, lr=lr), precision, 0)
        out[onebit] = {"relative_difference": relative_difference(a, b),
                       "moved": relative_difference(b, start)}  # so that "equal" is not "nothing happened"
    return out


def check_idle_rank(dist: Dist) -> dict:
    out = {}
    for name in ("onebit_adam", "onebit_lamb"):
        engine, masters, losses = train(dist, OptimizerConfig(name=name, lr=2e-3, freeze_step=3), "fp32", 8,
                                        idle_last_rank=True)
        checksum = torch.tensor([sum(float(p.double().sum()) for p in masters)], dtype=torch.float64)
        out[name] = {"identical": len(set(gathered(checksum))) == 1, "compressing": engine.client_optimizer.compressing,
                     "finite": all(bool(torch.isfinite(p).all()) for p in masters)}
    return out


class IdleTensorModel(torch.nn.Module):
    """A used layer and a 2-D weight that never gets a gradient; ZeRO puts the latter last in the flat buffer."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(16, 16)
        self.idle = torch.nn.Parameter(torch.randn(64, 64) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.used(x) ** 2).mean() + 0.0 * self.idle.sum()


def check_zero_partition(dist: Dist) -> dict:
    torch.manual_seed(0)
    model = IdleTensorModel()
    before = model.used.weight.detach().clone()
    optimizer = build_optimizer(OptimizerConfig(name="lamb", lr=1e-2), model, 1e-2)
    cfg = ds_config(REPO / "ds_configs/pretrain_zero2_lamb.json", BatchPlan(4, 1, dist.world_size, "fp32", 1.0))
    engine = Engine(model, optimizer, None, cfg, dist)
    gen = torch.Generator().manual_seed(dist.rank)
    for _ in range(3):
        loss = engine.ds(torch.randn(4, 16, generator=gen))
        engine.backward(loss)
        engine.step()
    # which tensors of the decay group this rank's partition holds, in DeepSpeed's order
    tensors = engine.optimizer.round_robin_bit16_groups[0]
    idle = next(i for i, t in enumerate(tensors) if t.numel() == model.idle.numel())
    only_idle = torch.tensor([float(optimizer._grouped()[0][1].kept_owners == (idle,))])
    after = model.used.weight.detach()
    return {"finished": True, "a_rank_holds_only_the_idle_tensor": max(gathered(only_idle)) == 1.0,
            "used_weight_moved": float((after - before).abs().max()) > 0,
            "identical": len(set(gathered(after.double().sum().reshape(1)))) == 1}


def main(out: Path) -> None:
    dist = Dist(detect(os.environ))
    dist.init_process_group()
    result = {"warmup_fp32": check_warmup(dist, "fp32"), "warmup_bf16": check_warmup(dist, "bf16")}
    if dist.world_size > 1:
        result.update(compress=check_compress(dist), idle_rank=check_idle_rank(dist),
                      zero_partition=check_zero_partition(dist))
    if dist.is_main:
        out.write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.shutdown()  # leaving with gloo threads alive can abort the process at exit


if __name__ == "__main__":
    main(Path(sys.argv[1]))
