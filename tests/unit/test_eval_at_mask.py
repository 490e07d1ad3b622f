"""The evaluation's context loss keeps only the labels whose input is [MASK]; the model's init std is the config's."""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig
from pipeline.data.masking import IGNORE
from pipeline.model.bert import bert_config, build_model
from pipeline.train import _with_mask_only_labels


def test_mask_only_labels_drop_the_copied_and_random_positions():
    mask_id = 4
    inputs = torch.tensor([[9, mask_id, 7, 8, mask_id]])  # position 2 kept as is, 3 replaced at random
    labels = torch.tensor([[IGNORE, 11, 7, 12, 13]])
    batch = _with_mask_only_labels({"input_ids": inputs, "labels": labels}, mask_id)
    assert batch["mask_only_labels"].tolist() == [[IGNORE, 11, IGNORE, IGNORE, 13]]
    assert batch["labels"] is labels  # the full labels stay for the overall loss


def test_init_std_reaches_the_weights():
    torch.manual_seed(0)
    for std in (0.02, 0.0625):
        config = bert_config(ModelConfig(preset="tiny", init_std=std), vocab_size=512)
        weight = build_model(config, pairs=False).bert.encoder.layer[0].intermediate.dense.weight
        assert abs(float(weight.std()) / std - 1) < 0.05
