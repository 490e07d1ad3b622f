"""The stages, their order, what each reads from the run directory and which config sections it uses.

Each stage lives in `pipeline/stages/<name>.py` and exposes `run(ctx: StageContext) -> StageResult`
(`pipeline.runner`); nothing here imports a stage, so listing stages costs nothing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import RunConfig

ORDER = ("prepare", "pretrain", "search", "prune", "retrain", "finetune")


@dataclass(frozen=True)
class StageSpec:
    name: str
    sections: tuple[str, ...]  # config sections the stage's output depends on (hashed)
    needs: Callable[[RunConfig], tuple[str, ...]]  # stages whose outputs it reads

    @property
    def module(self) -> str:
        return f"pipeline.stages.{self.name}"

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def _finetune_needs(cfg: RunConfig) -> tuple[str, ...]:
    # finetune starts from stages' exports and/or HF BERT directories on disk; the pruned
    # weights carry no tokenizer, so those read prepare's; scratch is pretrain's architecture
    stages = [("pretrain" if m == "scratch" else m) for m in cfg.finetune.models if m in ORDER or m == "scratch"]
    if "prune" in stages:
        stages.append("prepare")
    return tuple(dict.fromkeys(stages))


def _retrain_needs(cfg: RunConfig) -> tuple[str, ...]:
    # continue_search reads how many steps the search trained (its stage record), so a changed search
    # makes retrain stale even when the ticket it cut, and so prune's output, came out the same
    return ("prepare", "prune") + (("search",) if cfg.retrain.continue_search else ())


def stage_specs() -> dict[str, StageSpec]:
    train = ("model", "optimizer", "schedule", "pretrain", "distributed")
    specs = (
        StageSpec("prepare", ("data",), lambda cfg: ()),
        StageSpec("pretrain", ("data",) + train, lambda cfg: ("prepare",)),
        StageSpec("search", ("data", "search") + train, lambda cfg: ("prepare",)),
        StageSpec("prune", ("search", "retrain"), lambda cfg: ("search",)),
        StageSpec("retrain", ("data", "retrain") + train, _retrain_needs),
        StageSpec("finetune", ("finetune", "distributed"), _finetune_needs),
    )
    return {spec.name: spec for spec in specs}
