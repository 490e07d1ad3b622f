"""The optimizer named in the run config, over BERT's weight-decay parameter groups."""

from __future__ import annotations

import torch

from pipeline.config import OptimizerConfig
from pipeline.errors import ConfigError
from pipeline.optim.lamb import Lamb, lamb_param_groups


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = lamb_param_groups(model, cfg.weight_decay)
    if cfg.name == "lamb":
        return Lamb(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer.name: '{cfg.name}' is not available in this version of the pipeline")
