"""Host time of one pretrain step at BERT-base's structure, with the arithmetic taken away: what a GPU
step must hide behind its kernels, and how much of it DeepSpeed and eager PyTorch each add.

BERT-base's module and tensor structure (12 layers, 12 heads, 202 parameter tensors, sparse MLM head,
LAMB) at widths so small (hidden 48, FFN 192, vocab 1,024, seq 32, micro-batch 2) that the step's
arithmetic is negligible: what is left is Python, the dispatcher, the allocator and the engine's
bookkeeping, the work a host does per step whatever the device (a GPU adds its launch latency per
kernel on top). One process, CPU, one after the other in this run:
  plain loop               forward, backward, LAMB step (multi-tensor, as on GPU tensors), zero_grad
  DeepSpeed ZeRO-1         the pretrain stage's engine, ds_configs/pretrain_zero1_lamb.json as filled for
                           one rank (overlap_comm, contiguous_gradients "auto" -> off: no gradient hooks)
  ZeRO-1, hooks            the same file as filled for several ranks (both on: every gradient hooked)
  DeepSpeed ZeRO-2         ds_configs/pretrain_zero2_lamb.json (stage 2 hooks every gradient)
each eager (15% masking, the sparse head's `nonzero`) and static + compiled (fixed-count masking,
forward + loss as one graph); the step split into forward, backward (with the engine's hooks) and
optimizer step (with the engine's gradient copies, clipping norm and parameter copies). The budget
line: BERT-base's GPU time per step at 50% MFU on an H100 (989 TFLOP/s dense bf16), micro-batch 256,
seq 128, from the model's FLOP count. "host reads": operations in one step whose result the host reads
back (`.item()`, `nonzero`, ...): each one a device sync on a GPU.
Writes bench/results/host_overhead.{json,md}.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import MaskingConfig, ModelConfig, OptimizerConfig
from pipeline.data.masking import mask_tokens, masked_positions, positions_per_row
from pipeline.data.tokenizer import TokenizerInfo
from pipeline.dist import Dist, detect
from pipeline.engine import BatchPlan, Engine, ds_config
from pipeline.model.bert import PretrainObjective, bert_config, build_model, compile_whole, train_flops_per_token
from pipeline.optim.build import build_optimizer
from pipeline.optim.groups import param_groups
from pipeline.optim.lamb import Lamb

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
VOCAB, SEQ, MICRO, STEPS, WARMUP = 1024, 32, 2, 40, 8
SHAPE = dict(hidden_size=48, num_layers=12, num_heads=12, intermediate_size=192, max_position_embeddings=SEQ)
LOOPS = {"plain loop": None, "DeepSpeed ZeRO-1": "pretrain_zero1_lamb.json",
         "DeepSpeed ZeRO-1, hooks": "pretrain_zero1_lamb.json", "DeepSpeed ZeRO-2": "pretrain_zero2_lamb.json"}


def batches(static: bool) -> list[dict]:
    info = TokenizerInfo(vocab_size=VOCAB, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, sha256="")
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(5, VOCAB, (MICRO, SEQ), generator=gen)
        ids[:, 0], ids[:, -1] = info.cls_id, info.sep_id
        masked, labels = mask_tokens(ids, MaskingConfig(fixed_count=static), info, gen)
        batch = {"input_ids": masked, "token_type_ids": torch.zeros_like(ids), "labels": labels}
        if static:  # packed full rows: no mask at all, as the loader gives them
            batch["mlm_positions"] = masked_positions(labels, positions_per_row(SEQ, 0.15))
        else:
            batch["attention_mask"] = torch.ones_like(ids)
        out.append(batch)
    return out


def objective(static: bool) -> PretrainObjective:
    torch.manual_seed(0)
    model = PretrainObjective(build_model(bert_config(ModelConfig(preset="base", dropout=0.0, **SHAPE), VOCAB), False))
    if static:
        compile_whole(model)
    return model


def step_times(loop: str, static: bool) -> dict[str, list[float]]:
    """Host seconds per step part, after warm-up."""
    model, data = objective(static), batches(static)
    if LOOPS[loop] is None:
        optimizer = Lamb(param_groups(model, 0.01), lr=1e-4, foreach=True)
        forward, backward = (lambda b: model(**b).loss), (lambda loss: loss.backward())

        def step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        optimizer = build_optimizer(OptimizerConfig(), model, 1e-4)
        ranks = 2 if "hooks" in loop else 1  # "auto" overlap settings as filled for several ranks
        cfg = ds_config(REPO / "ds_configs" / LOOPS[loop], BatchPlan(MICRO, 1, ranks, "fp32", 1.0))
        cfg["train_batch_size"] = MICRO  # the engine runs on one rank here
        engine = Engine(model, optimizer, None, cfg, Dist(detect(os.environ)))
        forward, backward, step = (lambda b: engine(**b).loss), engine.backward, engine.step
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for i, batch in enumerate(data):
        t0 = time.perf_counter()
        loss = forward(batch)
        t1 = time.perf_counter()
        backward(loss)
        t2 = time.perf_counter()
        step()
        t3 = time.perf_counter()
        if i >= WARMUP:
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[key].append(dt)
    # one more step, counting what it reads back; compiled code runs eagerly for it (a dispatch mode cannot
    # be traced): the same operations
    with torch.compiler.set_stance("force_eager"), HostReads() as reads:
        backward(forward(data[0]))
        step()
    parts["host_reads"] = [float(reads.count)]
    return parts


class HostReads(TorchDispatchMode):
    """Counts operations whose result the host reads (each a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("_local_scalar_dense", "nonzero", "masked_select", "item")
        return func(*args, **(kwargs or {}))


def gpu_budget_ms() -> float:
    """BERT-base, seq 128, micro 256: GPU time per step at 50% of an H100's 989 TFLOP/s."""
    config = bert_config(ModelConfig(preset="base"), 30522)
    flops = train_flops_per_token(config, 128, 0.15, sparse=True) * 256 * 128
    return flops / (0.5 * 989e12) * 1e3


def main() -> None:
    torch.set_num_threads(1)  # host work is one thread's; the arithmetic left is too small to share
    rows = {}
    for loop in LOOPS:
        for static in (False, True):
            parts = step_times(loop, static)
            reads = int(parts.pop("host_reads")[0])
            total = [sum(t) for t in zip(*parts.values())]
            rows[f"{loop}, {'static+compiled' if static else 'eager'}"] = {
                "median_ms": statistics.median(total) * 1e3, "host_reads": reads,
                **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in parts.items()}}
    budget = gpu_budget_ms()
    base = rows["plain loop, eager"]["median_ms"]
    lines = [f"Host time per step at BERT-base's structure (12 layers, 12 heads, 202 tensors, LAMB, sparse MLM head) "
             f"with negligible arithmetic (hidden 48, FFN 192, vocab {VOCAB:,}, seq {SEQ}, micro-batch {MICRO}), "
             f"1 CPU thread, medians of {STEPS - WARMUP} steps after {WARMUP}. For scale: BERT-base's GPU time "
             f"per step at 50% MFU on an H100 (seq 128, micro-batch 256) is {budget:.0f} ms.", "",
             "| loop | host ms per step | forward | backward | optimizer step | ÷ plain eager | host reads |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['median_ms']:.1f} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} "
                     f"| {r['step_ms']:.1f} | {r['median_ms'] / base:.2f} | {r['host_reads']} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "host_overhead.json").write_text(json.dumps({"gpu_budget_ms": budget, "rows": rows}, indent=2) + "\n")
    (OUT / "host_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
