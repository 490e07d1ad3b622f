"""Slimming gates form their own parameter group in every optimizer: L1 is their only regulariser."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig, OptimizerConfig
from pipeline.model.bert import PretrainObjective, bert_config, build_model
from pipeline.model.gates import gates_for
from pipeline.optim.build import build_optimizer
from pipeline.optim.groups import param_groups


def _gated(seed: int = 0) -> PretrainObjective:
    torch.manual_seed(seed)
    objective = PretrainObjective(build_model(bert_config(ModelConfig(preset="tiny", dropout=0.0), 64), False))
    objective.gates = gates_for(objective.hf)
    return objective


def test_gates_are_a_group_of_their_own_without_decay_or_trust_ratio():
    objective = _gated()
    groups = param_groups(objective, 0.01)
    gates = [g for g in groups if g.get("gates")]
    assert len(gates) == 1 and {id(p) for p in gates[0]["params"]} == {id(objective.gates.heads),
                                                                       id(objective.gates.ffn)}
    assert gates[0]["weight_decay"] == 0.0 and not gates[0]["trust_ratio"]
    others = [p for g in groups if not g.get("gates") for p in g["params"]]
    assert not {id(objective.gates.heads), id(objective.gates.ffn)} & {id(p) for p in others}
    assert len(param_groups(objective.hf, 0.01)) == 2  # no gates, no empty group for DeepSpeed to partition


@pytest.mark.parametrize("name", ["lamb", "adamw", "onebit_adam", "onebit_lamb"])
def test_a_gate_update_is_the_plain_update_of_its_l1_penalised_gradient(name):
    """Step 1 of Adam-family optimizers without decay or layer adaptation moves each gate by lr x g/(|g|+eps)
    (bias-corrected moments are g and g^2): weight decay or a trust ratio on the gates would show here."""
    objective = _gated()
    lr, eps, l1 = 1e-2, 1e-6, 1e-4
    cfg = OptimizerConfig(name=name, lr=lr, eps=eps, weight_decay=0.01, freeze_step=10)
    optimizer = build_optimizer(cfg, objective, lr)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 64, (2, 16), generator=gen)
    labels = torch.where(torch.rand(2, 16, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    loss = objective(input_ids=ids, labels=labels).loss + objective.gates.l1(l1, l1)
    loss.backward()
    before = {k: getattr(objective.gates, k).detach().clone() for k in ("heads", "ffn")}
    grads = {k: getattr(objective.gates, k).grad.detach().clone() for k in ("heads", "ffn")}
    optimizer.step()
    for key in ("heads", "ffn"):
        expected = before[key] - lr * grads[key] / (grads[key].abs() + eps)
        assert torch.allclose(getattr(objective.gates, key).detach(), expected, atol=1e-6, rtol=0), key
