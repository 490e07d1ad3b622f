"""One process: the pretrain step through the DeepSpeed engine (ZeRO-1, one rank), counting the values it
reads back to the host (each a device sync on a GPU). Prints JSON {case: count}."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.config import MaskingConfig, ModelConfig, OptimizerConfig  # noqa: E402
from pipeline.data.masking import mask_tokens, masked_positions, positions_per_row  # noqa: E402
from pipeline.data.tokenizer import TokenizerInfo  # noqa: E402
from pipeline.dist import Dist, detect  # noqa: E402
from pipeline.engine import BatchPlan, Engine, ds_config  # noqa: E402
from pipeline.model.bert import PretrainObjective, bert_config, build_model  # noqa: E402
from pipeline.optim.build import build_optimizer  # noqa: E402
from tests.syncs import SyncCounter  # noqa: E402


def batch() -> dict:
    info = TokenizerInfo(vocab_size=300, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, sha256="")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, 32), generator=gen)
    masked, labels = mask_tokens(ids, MaskingConfig(fixed_count=True), info, gen)
    return {"input_ids": masked, "token_type_ids": torch.zeros_like(ids), "labels": labels,
            "mlm_positions": masked_positions(labels, positions_per_row(32, 0.15))}


def count(optimizer_name: str, precision: str) -> list[str]:
    torch.manual_seed(0)
    model = PretrainObjective(build_model(bert_config(ModelConfig(preset="tiny", num_layers=2, dropout=0.0,
                                                                  max_position_embeddings=32), 300), False))
    optimizer = build_optimizer(OptimizerConfig(name=optimizer_name), model, 1e-3)
    cfg = ds_config(REPO / "ds_configs" / "pretrain_zero1_lamb.json", BatchPlan(2, 1, 1, precision, 1.0))
    engine = Engine(model, optimizer, None, cfg, Dist(detect(os.environ)))
    for _ in range(2):
        engine.backward(engine(**batch()).loss)
        engine.step()
    with SyncCounter() as reads:
        engine.backward(engine(**batch()).loss)
        engine.step()
    assert engine.grad_norm() is not None  # the log line still gets a gradient norm
    return reads.seen


if __name__ == "__main__":
    print(json.dumps({f"{name} {precision}": count(name, precision)
                      for name, precision in (("lamb", "fp32"), ("lamb", "bf16"), ("adamw", "bf16"))}))
