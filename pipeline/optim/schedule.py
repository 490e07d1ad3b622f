"""Learning-rate schedule of BERT/LAMB pretraining: linear warmup, then polynomial decay."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipeline.config import ScheduleConfig


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr after `step` optimizer steps of a `total`-step phase."""
    warmup = int(round(cfg.warmup * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    power = 1.0 if cfg.decay == "linear" else cfg.power
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - progress) ** power


def warmup_poly(optimizer: Optimizer, total_steps: int, cfg: ScheduleConfig, start: int = 0) -> LambdaLR:
    """The schedule of a `total_steps` phase, entered at step `start` (a phase continued from elsewhere)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step + start, total_steps, cfg))
