"""Where one pretrain step's time goes: data, forward, backward, optimizer step (and a torch profile).

usage: python bench/step_profile.py PREPARE_DIR [preset] [micro_batch] [precision]
Builds the same objective, LAMB and DeepSpeed engine as the pretrain stage (ZeRO-1, 1 rank) and
times each part of the step with device synchronisation, then prints the top operators.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from pipeline.config import MaskingConfig, ModelConfig, OptimizerConfig, ScheduleConfig
from pipeline.data.loader import PretrainLoader, ShardSet
from pipeline.dist import Dist, detect
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.model.bert import PretrainObjective, bert_config, build_model
from pipeline.optim.build import build_optimizer
from pipeline.optim.schedule import warmup_poly

REPO = Path(__file__).resolve().parents[1]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    prepare_dir = Path(sys.argv[1])
    preset = sys.argv[2] if len(sys.argv) > 2 else "base"
    micro = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    precision = sys.argv[4] if len(sys.argv) > 4 else "bf16"
    shards = ShardSet(prepare_dir, 128, "train")
    torch.manual_seed(0)
    objective = PretrainObjective(build_model(bert_config(ModelConfig(preset=preset), shards.info.vocab_size), False))
    optimizer = build_optimizer(OptimizerConfig(), objective, 1e-3)
    plan = BatchPlan(micro, 1, 1, precision, 1.0)
    engine = Engine(objective, optimizer, warmup_poly(optimizer, 100, ScheduleConfig()),
                    ds_config(REPO / "ds_configs/pretrain_zero1_lamb.json", plan), Dist(detect(os.environ)))
    loader = PretrainLoader(shards, micro, MaskingConfig(), seed=1)
    parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}
    steps = 12
    for i in range(steps + 3):
        if i == 3:
            parts = dict.fromkeys(parts, 0.0)
        t0 = time.perf_counter()
        batch = {k: v for k, v in next(loader).items() if k != "rows"}
        sync()
        t1 = time.perf_counter()
        out = engine(**batch)
        sync()
        t2 = time.perf_counter()
        engine.backward(out.loss)
        sync()
        t3 = time.perf_counter()
        engine.step()
        sync()
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key] += dt
    total = sum(parts.values())
    tokens = micro * 128 * steps
    print(f"{preset} micro {micro} {precision}: {tokens / total:,.0f} tokens/s; per step " +
          ", ".join(f"{k} {v / steps * 1000:.1f} ms" for k, v in parts.items()))
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            batch = {k: v for k, v in next(loader).items() if k != "rows"}
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
        sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))
    loader.close()


if __name__ == "__main__":
    main()
