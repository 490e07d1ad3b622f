"""P2: the pretrain loop's tokens/s vs a minimal plain-PyTorch loop, same model, optimizer and batches.

Both run in this process on CPU, one after the other, on real prepared data (BBC News with the
bert-base-uncased vocab, seq 128): BERT-small geometry (4 layers, hidden 512, 8 heads), the
sparse MLM head, this project's LAMB, fp32, micro-batch 32, no accumulation.
  plain     model(batch) -> loss.backward() -> optimizer.step() -> zero_grad, batches pre-built
  pipeline  the pretrain stage's own step: the loader (prefetch, dynamic masking) and the
            DeepSpeed engine (ZeRO-1, gradient clipping, LR schedule), as `Trainer._train_step` runs it
Each loop's MFU is its model FLOPs per second (the trainer's own accounting) over a square fp32
matmul's rate measured in the same run: `clusters/this-machine.yaml` reads the pipeline's as its MFU.
Writes bench/results/pretrain_overhead.md and .json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
STEPS, WARMUP, MICRO, SEQ = 12, 3, 32, 128


def prepare(tmp: Path) -> Path:
    cfg = {"run": {"name": "p2", "root": str(tmp)},
           "data": {"sources": [{"kind": "text", "paths": [str(REPO / ".cache/corpora/bbc/business")],
                                 "doc_split": "file"}],
                    "tokenizer": {"kind": "bert-base-uncased"}, "seq_lengths": [SEQ], "validation_fraction": 0.0,
                    "workers": 1}}
    (tmp / "p2.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--config", str(tmp / "p2.yaml")], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    return tmp / "p2" / "prepare"


def build(prepare_dir: Path):
    from pipeline.config import ModelConfig
    from pipeline.data.loader import ShardSet
    from pipeline.model.bert import PretrainObjective, bert_config, build_model
    from pipeline.optim.groups import param_groups
    from pipeline.optim.lamb import Lamb

    shards = ShardSet(prepare_dir, SEQ, "train")
    torch.manual_seed(0)
    model = PretrainObjective(build_model(bert_config(ModelConfig(preset="small"), shards.info.vocab_size), False))
    return shards, model, Lamb(param_groups(model, 0.01), lr=1e-3)


def plain_loop(prepare_dir: Path) -> float:
    from pipeline.config import MaskingConfig
    from pipeline.data.loader import PretrainLoader

    shards, model, optimizer = build(prepare_dir)
    loader = PretrainLoader(shards, MICRO, MaskingConfig(), seed=1)
    batches = [{k: v for k, v in next(loader).items() if k != "rows"} for _ in range(STEPS)]
    loader.close()
    for i, batch in enumerate(batches):
        if i == WARMUP:
            start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (STEPS - WARMUP) * MICRO * SEQ / (time.perf_counter() - start)


def pipeline_loop(prepare_dir: Path) -> float:
    from pipeline.config import MaskingConfig, ScheduleConfig
    from pipeline.data.loader import PretrainLoader
    from pipeline.dist import Dist, detect
    from pipeline.engine import BatchPlan, Engine, ds_config
    from pipeline.optim.schedule import warmup_poly
    from pipeline.train import PhasePlan, Trainer, TrainHooks

    shards, model, optimizer = build(prepare_dir)
    dist = Dist(detect(os.environ))
    plan = PhasePlan(0, SEQ, STEPS, BatchPlan(MICRO, 1, 1, "fp32", 1.0), 1e-3, 0, 0.1)
    engine = Engine(model, optimizer, warmup_poly(optimizer, STEPS, ScheduleConfig()),
                    ds_config(REPO / "ds_configs/cpu_demo.json", plan.batch), dist)
    loader = PretrainLoader(shards, MICRO, MaskingConfig(), seed=1)
    trainer = Trainer.__new__(Trainer)  # only the step function: no run directory needed
    trainer.hooks = TrainHooks()
    for i in range(STEPS):
        if i == WARMUP:
            start = time.perf_counter()
        trainer._train_step(engine, loader, plan)
    loader.close()
    return (STEPS - WARMUP) * MICRO * SEQ / (time.perf_counter() - start)


def flops_per_token(vocab: int) -> float:
    from pipeline.config import MaskingConfig, ModelConfig
    from pipeline.model.bert import bert_config, train_flops_per_token

    return train_flops_per_token(bert_config(ModelConfig(preset="small"), vocab), SEQ, MaskingConfig().probability,
                                 True)


def main() -> None:
    from pipeline.plan.measure import matmul_tflops

    with tempfile.TemporaryDirectory() as tmp:
        prepare_dir = prepare(Path(tmp))
        peak = matmul_tflops()  # the rate the MFU is a fraction of, measured beside the loops
        plain = plain_loop(prepare_dir)
        piped = pipeline_loop(prepare_dir)
        peak = max(peak, matmul_tflops())
    flops = flops_per_token(30522)
    result = {"plain_tokens_per_s": plain, "pipeline_tokens_per_s": piped, "ratio": piped / plain,
              "geometry": "small (4 layers, hidden 512, 8 heads), vocab 30522, seq 128, micro-batch 32, fp32",
              "threads": torch.get_num_threads(), "matmul_tflops": peak, "flops_per_token": flops,
              # variants for a cluster file's mfu_from: the model FLOPs reached, as a fraction of the matmul rate
              "plain": {"tokens_per_s": plain, "mfu": plain * flops / (peak * 1e12)},
              "pipeline": {"tokens_per_s": piped, "mfu": piped * flops / (peak * 1e12)}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pretrain_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join([
        f"BERT-small geometry, vocab 30522, seq {SEQ}, micro-batch {MICRO}, fp32, sparse MLM head, LAMB, "
        f"{torch.get_num_threads()} CPU threads; {STEPS - WARMUP} timed steps after {WARMUP} warm-up. MFU: "
        f"the model's FLOPs ({flops / 1e6:.1f} MFLOP per token) per second over a 2048^3 fp32 matmul's "
        f"{peak * 1e3:.0f} GFLOP/s measured in the same run.",
        "", "| loop | tokens/s | ratio | MFU |", "|---|---:|---:|---:|",
        f"| plain PyTorch (forward, backward, LAMB step) | {plain:,.0f} | 1.00 | {result['plain']['mfu']:.1%} |",
        f"| pipeline step (loader + DeepSpeed engine, ZeRO-1, clipping, schedule) | {piped:,.0f} "
        f"| {piped / plain:.2f} | {result['pipeline']['mfu']:.1%} |"])
    (OUT / "pretrain_overhead.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
