"""DeepSpeed JSON filling and the refusals that come before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.engine import BatchPlan, ds_config
from pipeline.errors import ConfigError
from pipeline.train import plan_phases
from tests.conftest import REPO, write_config

PLAN = BatchPlan(micro_batch=8, grad_accum=4, world_size=2, precision="bf16", grad_clip=1.0)


def _json(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", ["cpu_demo.json", "pretrain_zero1_lamb.json", "pretrain_zero2_lamb.json"])
def test_shipped_ds_configs_fill_in(name):
    cfg = ds_config(REPO / "ds_configs" / name, PLAN, on_gpu=False)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (64, 8, 4)
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False and cfg["gradient_clipping"] == 1.0


def test_conflicting_batch_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match='train_micro_batch_size_per_gpu=16 conflicts .* set it to "auto"'):
        ds_config(_json(tmp_path, {"train_micro_batch_size_per_gpu": 16}), PLAN, on_gpu=False)


def test_fp16_on_cpu_is_refused(tmp_path):
    plan = BatchPlan(8, 1, 1, "fp16", 1.0)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        ds_config(_json(tmp_path, {}), plan, on_gpu=False)
    assert ds_config(_json(tmp_path, {}), plan, on_gpu=True)["fp16"]["loss_scale"] == 0  # dynamic on GPU


@pytest.mark.parametrize("data,message", [({"zero_optimization": {"stage": 3}}, "stage=3 is not supported"),
                                          ({"optimizer": {"type": "Adam"}}, "optimizer and scheduler come from"),
                                          ({"bf16": {"enabled": False}}, "bf16.enabled=False conflicts")])
def test_impossible_combinations_are_refused(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        ds_config(_json(tmp_path, data), PLAN, on_gpu=False)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ds_config(tmp_path / "nope.json", PLAN)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,,}')
    with pytest.raises(ConfigError, match=r"bad.json:1:\d+: invalid JSON"):
        ds_config(bad, PLAN)


def test_phase_plans_check_batch_divisibility_and_lengths(tmp_path):
    base = {"run": {"name": "x"}, "data": {"seq_lengths": [128]},
            "pretrain": {"phases": [{"seq_len": 128, "steps": 10, "global_batch_size": 96, "micro_batch_size": 16}]}}
    cfg = load_config(write_config(tmp_path / "a.yaml", base))
    plan = plan_phases(cfg, world_size=3)[0]
    assert (plan.batch.grad_accum, plan.batch.global_batch) == (2, 96)
    with pytest.raises(ConfigError, match="global_batch_size: 96 is not a multiple of .* 16 x 4"):
        plan_phases(cfg, world_size=4)
    base["pretrain"]["phases"][0]["seq_len"] = 512
    with pytest.raises(ConfigError, match="seq_len: 512 is not among data.seq_lengths"):
        plan_phases(load_config(write_config(tmp_path / "b.yaml", base)), world_size=1)


def test_each_phase_may_set_its_own_warmup(tmp_path):
    phases = [{"seq_len": 128, "steps": 10, "global_batch_size": 8, "micro_batch_size": 8, "warmup": 0.5},
              {"seq_len": 128, "steps": 10, "global_batch_size": 8, "micro_batch_size": 8}]
    base = {"run": {"name": "x"}, "data": {"seq_lengths": [128]}, "schedule": {"warmup": 0.2},
            "pretrain": {"phases": phases}}
    first, second = plan_phases(load_config(write_config(tmp_path / "a.yaml", base)), world_size=1)
    assert (first.warmup, second.warmup) == (0.5, 0.2)


def test_comment_keys_are_dropped_at_any_depth(tmp_path):
    path = _json(tmp_path, {"//": "why", "zero_optimization": {"// stage": "why this stage", "stage": 1}})
    cfg = ds_config(path, PLAN, on_gpu=False)
    assert cfg["zero_optimization"] == {"stage": 1} and "//" not in cfg
    for name in ("pretrain_zero1_lamb.json", "pretrain_zero2_lamb.json"):
        shipped = json.dumps(ds_config(REPO / "ds_configs" / name, PLAN, on_gpu=False))
        assert "//" not in shipped


@pytest.mark.parametrize("world_size", [1, 2])
def test_auto_overlap_hooks_gradients_only_when_there_is_a_reduction_to_overlap(world_size):
    plan = BatchPlan(micro_batch=8, grad_accum=1, world_size=world_size, precision="fp32", grad_clip=1.0)
    zero = ds_config(REPO / "ds_configs" / "pretrain_zero1_lamb.json", plan, on_gpu=False)["zero_optimization"]
    assert zero["overlap_comm"] is zero["contiguous_gradients"] is (world_size > 1)
