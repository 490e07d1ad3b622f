"""P4: training step time of the EarlyBERT-pruned BERT-base geometry vs the dense one, CPU, seq 128.

Both with the sparse MLM head, fp32, LAMB, the same batches, one after the other in this process.
Pruned: 4 of 12 heads removed in every layer, 40% of FFN neurons removed over all layers (which ones
does not matter for speed; drawn at random with a fixed seed). A third model with the same embedding
and MLM head but no encoder layers measures what pruning cannot shrink (the word embedding's
gradient and LAMB update, the masked-position vocabulary projection), so the encoder's own ratio is
(pruned - fixed) / (dense - fixed). Writes bench/results/pruned_step_time.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.earlybird import random_masks
from pipeline.model.bert import PretrainObjective, bert_config, build_model, count_parameters
from pipeline.model.prune import prune_model
from pipeline.optim.groups import param_groups
from pipeline.optim.lamb import Lamb

OUT = Path(__file__).resolve().parents[1] / "bench" / "results"
STEPS, WARMUP, MICRO, SEQ, VOCAB = 10, 2, 8, 128, 30522


def batches() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(5, VOCAB, (MICRO, SEQ), generator=gen)
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                    "labels": labels})
    return out


def step_time(model: torch.nn.Module, data: list[dict]) -> float:
    objective = PretrainObjective(model, sparse=True)
    optimizer = Lamb(param_groups(objective, 0.01), lr=1e-4)
    for i, batch in enumerate(data):
        if i == WARMUP:
            start = time.perf_counter()
        objective(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / (STEPS - WARMUP)


def main() -> None:
    data = batches()
    config = bert_config(ModelConfig(preset="base", dropout=0.0), VOCAB)
    torch.manual_seed(0)
    dense = build_model(config, pairs=False)
    dense_params = count_parameters(dense)
    dense_time = step_time(dense, data)
    torch.manual_seed(0)
    pruned = build_model(config, pairs=False)
    masks = random_masks((12, 12), (12, 3072), 1 / 3, 0.4, "layerwise", "global", seed=0)
    prune_model(pruned, masks.to_plan())
    pruned_time = step_time(pruned, data)
    torch.manual_seed(0)
    aligned = build_model(config, pairs=False)  # the same ticket ratios, FFN widths multiples of 64
    aligned_masks = random_masks((12, 12), (12, 3072), 1 / 3, 0.4, "layerwise", "global", seed=0, ffn_multiple=64)
    prune_model(aligned, aligned_masks.to_plan())
    aligned_time = step_time(aligned, data)
    torch.manual_seed(0)
    fixed = build_model(config, pairs=False)
    fixed.bert.encoder.layer = torch.nn.ModuleList()  # the embedding feeds the MLM head directly
    fixed_time = step_time(fixed, data)
    encoder = (pruned_time - fixed_time) / (dense_time - fixed_time)
    aligned_encoder = (aligned_time - fixed_time) / (dense_time - fixed_time)
    result = {"dense_seconds": dense_time, "pruned_seconds": pruned_time, "ratio": pruned_time / dense_time,
              "aligned_seconds": aligned_time, "aligned_ratio": aligned_time / dense_time,
              "fixed_seconds": fixed_time, "encoder_ratio": encoder, "aligned_encoder_ratio": aligned_encoder,
              "ffn_widths": masks.ffn.sum(1).tolist(), "aligned_ffn_widths": aligned_masks.ffn.sum(1).tolist(),
              "dense_parameters": dense_params, "pruned_parameters": count_parameters(pruned),
              "aligned_parameters": count_parameters(aligned),
              "threads": torch.get_num_threads()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pruned_step_time.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join([
        f"BERT-base geometry, vocab {VOCAB}, seq {SEQ}, micro-batch {MICRO}, fp32, sparse MLM head, LAMB, "
        f"{torch.get_num_threads()} CPU threads; mean of {STEPS - WARMUP} steps after {WARMUP} warm-up.", "",
        "| model | parameters | seconds per step | ratio |", "|---|---:|---:|---:|",
        f"| dense (12 heads, FFN 3072) | {dense_params / 1e6:.1f}M | {dense_time:.2f} | 1.00 |",
        f"| pruned (8 heads per layer, 60% of FFN) | {result['pruned_parameters'] / 1e6:.1f}M | {pruned_time:.2f} "
        f"| {result['ratio']:.2f} |",
        f"| pruned, FFN widths rounded to multiples of 64 (`search.ffn_multiple: 64`) | "
        f"{result['aligned_parameters'] / 1e6:.1f}M | {aligned_time:.2f} | {result['aligned_ratio']:.2f} |",
        f"| no encoder layers (embedding, MLM head, their LAMB update) | {count_parameters(fixed) / 1e6:.1f}M "
        f"| {fixed_time:.2f} | {fixed_time / dense_time:.2f} |", "",
        f"Encoder alone (step minus the no-encoder step): pruned/dense {encoder:.2f}, with widths multiples of 64 "
        f"{aligned_encoder:.2f}. FFN widths per layer: {result['ffn_widths']} (rounded: "
        f"{result['aligned_ffn_widths']})."])
    (OUT / "pruned_step_time.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
