"""The evaluation's context loss keeps only the labels whose input is [MASK]; the model's init std is the config's."""

from __future__ import annotations

import pytest
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


class _Engine:
    """What Trainer._evaluate asks of an engine: the module, and calling it."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **batch):
        return self.module(**batch)


def _eval_batches(mask_id: int, vocab: int, fixed: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        inputs = torch.randint(5, vocab, (4, 16), generator=gen)
        chosen = torch.rand(4, 16, generator=gen) < 0.3
        labels = torch.where(chosen, inputs, torch.full_like(inputs, IGNORE))
        inputs = torch.where(chosen & (torch.rand(4, 16, generator=gen) < 0.8), mask_id, inputs)
        batch = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels}
        if fixed:  # fixed-count masking: every row decodes the same number of positions (padded with IGNORE)
            batch["mlm_positions"] = torch.argsort((~chosen).int(), dim=1, stable=True)[:, :6]
        batches.append(_with_mask_only_labels(batch, mask_id))
    return batches


@pytest.mark.parametrize("sparse, fixed", [(True, False), (True, True), (False, False)],
                         ids=["sparse", "fixed-positions", "dense-head"])
def test_evaluation_takes_both_losses_from_one_forward(sparse, fixed):
    from types import SimpleNamespace

    from pipeline.model.bert import PretrainObjective
    from pipeline.train import Trainer

    torch.manual_seed(0)
    config = bert_config(ModelConfig(preset="tiny", dropout=0.0), vocab_size=64)
    objective = PretrainObjective(build_model(config, pairs=False), sparse=sparse)
    calls = []
    objective.hf.bert.register_forward_hook(lambda *args: calls.append(1))
    batches = _eval_batches(mask_id=4, vocab=64, fixed=fixed)
    scores = Trainer._evaluate(SimpleNamespace(dist=SimpleNamespace(world_size=1)), _Engine(objective), batches)
    assert len(calls) == len(batches)
    # the same figures as two forwards, one with the labels kept only at [MASK] inputs
    total = at = masked = at_count = 0.0
    with torch.no_grad():
        for batch in batches:
            plain = {k: v for k, v in batch.items() if k not in ("rows", "mask_only_labels")}
            out, only = objective(**plain), objective(**{**plain, "labels": batch["mask_only_labels"]})
            total, masked = total + float(out.mlm_loss) * float(out.masked), masked + float(out.masked)
            at, at_count = at + float(only.mlm_loss) * float(only.masked), at_count + float(only.masked)
    assert scores["eval_loss"] == pytest.approx(total / masked, rel=1e-5)
    assert scores["eval_loss_at_mask"] == pytest.approx(at / at_count, rel=1e-5)
