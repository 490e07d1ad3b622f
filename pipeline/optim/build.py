"""The optimizer named in the run config, over the parameter groups of `optim.groups`."""

from __future__ import annotations

import torch

from pipeline.config import OptimizerConfig
from pipeline.errors import ConfigError
from pipeline.optim.groups import param_groups
from pipeline.optim.lamb import Lamb
from pipeline.optim.onebit import onebit_adam, onebit_lamb


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lamb":
        return Lamb(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    trust_ratio_clip=cfg.trust_ratio_clip)
    if cfg.name == "adamw":
        return adamw(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.freeze_step < 1:
        raise ConfigError(f"optimizer.freeze_step: {cfg.name} needs a full-precision warmup of at least 1 step "
                          "(its variance is frozen after it); the papers use 15-25% of the first phase")
    common = dict(lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, freeze_step=cfg.freeze_step)
    if cfg.name == "onebit_adam":
        return onebit_adam(groups, **common)
    return onebit_lamb(groups, **common, trust_ratio_clip=cfg.trust_ratio_clip, **cfg.onebit_lamb.model_dump())


def adamw(groups: list[dict], **settings) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernels (CUDA and CPU): the whole step in one pass over each tensor
    chunk, instead of the default's ~10 operations per tensor on CPU or its multi-tensor loop on a GPU."""
    return torch.optim.AdamW(groups, fused=True, **settings)
