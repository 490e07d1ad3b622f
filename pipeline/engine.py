"""The DeepSpeed boundary: the only module that imports `deepspeed`.

It loads a real JSON from ds_configs/, fills in the values the pipeline config owns (batch
sizes, precision, gradient clipping, the TensorBoard monitor), refuses combinations that
cannot work before anything starts, and wraps the engine in the few calls the training
loop needs. It also tells the LAMB optimizer how DeepSpeed flattened and partitioned the
parameters (`flat_layouts`), from DeepSpeed's own bookkeeping.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.dist import Dist
from pipeline.errors import ConfigError, StageInputError
from pipeline.optim.lamb import FlatLayout

OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping")


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    world_size: int
    precision: str
    grad_clip: float

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def ds_config(path: Path, plan: BatchPlan, tensorboard_dir: Path | None = None, job_name: str = "pretrain",
              on_gpu: bool | None = None, compressed: bool = False, section: str = "pretrain") -> dict[str, Any]:
    """The effective DeepSpeed config: the file's, with the pipeline's values filled in and checked."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"distributed.ds_config: {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    cfg = _without_comments(cfg)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    owned = {"train_batch_size": plan.global_batch, "train_micro_batch_size_per_gpu": plan.micro_batch,
             "gradient_accumulation_steps": plan.grad_accum, "gradient_clipping": plan.grad_clip}
    for key, value in owned.items():
        given = cfg.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{path}: {key}={given} conflicts with the run config's {value}; set it to \"auto\"")
        cfg[key] = value
    _fill_precision(cfg, plan.precision, path, on_gpu, section)
    _fill_overlap(cfg, plan.world_size)
    _refuse_impossible(cfg, path)
    if compressed and zero_stage(cfg) != 0:
        raise ConfigError(f"{path}: zero_optimization.stage={zero_stage(cfg)} with a 1-bit optimizer: 1-bit Adam/LAMB "
                          "replace the gradient all-reduce that ZeRO partitions; use stage 0")
    if tensorboard_dir is not None:
        cfg["tensorboard"] = {"enabled": True, "output_path": str(tensorboard_dir), "job_name": job_name}
    cfg["zero_allow_untested_optimizer"] = True  # the optimizer is ours (LAMB, AdamW): known to work
    cfg.setdefault("steps_per_print", 10**9)  # the pipeline logs; DeepSpeed's own step log is noise
    return cfg


def _without_comments(value: Any) -> Any:
    """JSON has no comments: keys that start with "//" say why a setting is what it is, and are dropped
    here, at any depth, before DeepSpeed (whose sections refuse unknown keys) sees the config."""
    if isinstance(value, dict):
        return {k: _without_comments(v) for k, v in value.items() if not k.startswith("//")}
    return value


def _fill_overlap(cfg: dict, world_size: int) -> None:
    """ZeRO's "auto" overlap_comm / contiguous_gradients: on with more than one rank, off with one.

    Either one on makes ZeRO-1 hook every parameter's gradient: measured 6-10 ms more host time per step
    at BERT-base's 202 tensors (bench/results/host_overhead.md), for nothing when there is no reduction
    to overlap. With several ranks the hooks start reducing buckets while backward still runs.
    """
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        for key in ("overlap_comm", "contiguous_gradients"):
            if zero.get(key) == "auto":
                zero[key] = world_size > 1


def _fill_precision(cfg: dict, precision: str, path: Path, on_gpu: bool, section: str) -> None:
    if precision == "fp16" and not on_gpu:
        raise ConfigError(f"{section}.precision: fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    for key in ("bf16", "fp16"):
        section = dict(cfg.get(key, {}))
        if section.get("enabled", "auto") not in ("auto", precision == key):
            raise ConfigError(f"{path}: {key}.enabled={section['enabled']} conflicts with precision {precision}")
        section["enabled"] = precision == key
        cfg[key] = section
    if precision == "fp16":
        cfg["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
        cfg["fp16"].setdefault("initial_scale_power", 16)


def _refuse_impossible(cfg: dict, path: Path) -> None:
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={stage} is not supported: LAMB's per-layer trust "
                          "ratios, slimming gates and structural pruning need whole parameters (use 0, 1 or 2)")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(f"{path}: optimizer and scheduler come from the run config (optimizer, schedule "
                          "sections); remove them from the DeepSpeed JSON")


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def save_ds_config(cfg: dict, path: Path) -> None:
    from pipeline.rundir import atomic_write_json

    atomic_write_json(path, cfg)


class Engine:
    """A DeepSpeed engine, reduced to what the training loop uses."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: dict,
                 dist: Dist):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # its per-step INFO lines drown the pipeline's own log
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

        dist.init_process_group()  # ours (timeout, backend); DeepSpeed adopts an existing group
        deepspeed.init_distributed(dist_backend=dist.backend(), auto_mpi_discovery=False,
                                   distributed_port=dist.env.master_port, verbose=False)
        # DeepSpeed's fp16/bf16 wrapper "initialises optimizer state" by calling step() on zero
        # gradients: for AdamW a spurious step (weight decay, an extra bias-correction count), for
        # the 1-bit optimizers a warmup step. Told apart here, where it is known, rather than by
        # each optimizer guessing from its gradients (a guess one rank could make and another not).
        cfg = clipping_in_optimizer(cfg, optimizer)
        own_step = optimizer.__dict__.get("step")  # torch's LR scheduler wraps step() on the instance
        optimizer.step = lambda closure=None: None
        try:
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg,
                model_parameters=[p for p in model.parameters() if p.requires_grad], dist_init_required=False)
        finally:
            if own_step is None:
                del optimizer.step  # the class's own step again
            else:
                optimizer.step = own_step
        if hasattr(optimizer, "set_layouts"):
            optimizer.set_layouts(flat_layouts(self.optimizer, len(optimizer.param_groups)))
        if getattr(optimizer, "max_grad_norm", 0.0):
            optimizer.grad_norm_source = zero_norm_source(self.optimizer)
        if hasattr(optimizer, "attach"):  # 1-bit optimizers switch the engine's all-reduce off after warmup
            optimizer.attach(lambda on: setattr(self.ds, "enable_backward_allreduce", on))
        self.client_optimizer = optimizer
        self._dense_bytes = 0
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        world = dist.world_size
        self._dense_step_bytes = int(2 * (world - 1) / world * 4 * n)  # ring all-reduce of fp32 gradients

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def __call__(self, **batch: torch.Tensor):
        return self.ds(**{k: v.to(self.ds.device, non_blocking=True) for k, v in batch.items()})

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        boundary = self.ds.is_gradient_accumulation_boundary()
        allreduced = self.ds.enable_backward_allreduce
        self.ds.step()
        if boundary and allreduced:
            self._dense_bytes += self._dense_step_bytes

    def comm_bytes(self) -> int:
        """Gradient/momentum bytes this rank has sent so far (dense all-reduces estimated, 1-bit counted)."""
        return self._dense_bytes + int(getattr(self.client_optimizer, "bytes_sent", 0))

    def rank_state(self) -> dict:
        """Optimizer state that differs per rank (1-bit error feedback); DeepSpeed saves only rank 0's."""
        getter = getattr(self.client_optimizer, "rank_state_dict", None)
        return getter() if getter is not None else {}

    def load_rank_state(self, state: dict) -> None:
        loader = getattr(self.client_optimizer, "load_rank_state_dict", None)
        if loader is not None:
            loader(state)

    def fp32_values(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The fp32 master values of model parameters, whatever the training precision.

        Under bf16/fp16 the module holds rounded copies: gates at 1.0 move in steps of 2^-8 there, and
        masks drawn from them would rank rounding, not learning. Under ZeRO-1/2 this gathers the
        partitions: every rank must call it.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        values = []
        for param in params:
            master = safe_get_full_fp32_param(param)  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
            if master is None:
                master = self._wrapper_master(param)  # the fp16/bf16 wrapper of ZeRO stage 0
            values.append((param if master is None else master).detach().float().clone())
        return values

    def set_fp32_value(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set a parameter's master value (and its module copy)."""
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad():
            if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
                safe_set_full_fp32_param(param, value.to(param.device).float())
            else:
                master = self._wrapper_master(param)
                if master is not None:
                    master.copy_(value)
            param.copy_(value.to(param.dtype))

    def _wrapper_master(self, param: torch.Tensor) -> torch.Tensor | None:
        low, high = getattr(self.ds.optimizer, "fp16_groups", None), getattr(self.ds.optimizer, "fp32_groups", None)
        if low is None or high is None:
            return None
        for low_group, high_group in zip(low, high):
            for lp, hp in zip(low_group, high_group):
                if lp is param:
                    return hp
        return None

    def grad_norm(self) -> float | None:
        norm = getattr(self.client_optimizer, "grad_norm", None)  # clipping in the optimizer: its norm
        norm = self.ds.get_global_grad_norm() if norm is None else norm
        return None if norm is None else float(norm)

    def nonfinite_steps(self) -> int:
        """Steps whose gradient norm was inf/NaN (their weights left as they were), so far."""
        count = getattr(self.client_optimizer, "nonfinite_steps", None)
        return 0 if count is None else int(count)

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def log_events(self, events: list[tuple[str, float, int]]) -> None:
        if self.ds.monitor.enabled:
            self.ds.monitor.write_events(events)

    @staticmethod
    def to_universal(folder: Path, output: Path) -> None:
        """DeepSpeed's converter, run as its own process (it starts worker pools of its own)."""
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
               "--output_folder", str(output), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise StageInputError(f"{folder}: converting to a universal checkpoint failed: {last}")

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: Path, tag: str, module_only: bool = False) -> dict:
        path, client = self.ds.load_checkpoint(str(directory), tag=tag, load_module_only=module_only,
                                               load_optimizer_states=not module_only,
                                               load_lr_scheduler_states=not module_only)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {directory}")
        return client or {}


def clipping_in_optimizer(cfg: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Hand gradient clipping to an optimizer that does it on the device (LAMB, 1-bit LAMB), and turn off
    what in DeepSpeed's step reads values back to the host: its clipping (a validity check per parameter
    group) and bf16's overflow check. Those made the host wait for the GPU in every step
    (bench/results/host_overhead.md counts them). fp16 keeps DeepSpeed's: its loss scaler needs the check."""
    if not hasattr(optimizer, "max_grad_norm") or cfg.get("fp16", {}).get("enabled"):
        return cfg
    optimizer.max_grad_norm = float(cfg.get("gradient_clipping") or 0.0) or float("inf")  # inf: check, no clip
    return {**cfg, "gradient_clipping": 0.0, "bf16": {**cfg.get("bf16", {}), "check_grad_overflow": False}}


def zero_norm_source(ds_optimizer: Any) -> Callable[[], Any] | None:
    """ZeRO-1/2 compute the global gradient norm (on the device, all ranks' partitions) and then call the
    client optimizer once per parameter group: the optimizer clips with that norm, read where ZeRO keeps it."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(ds_optimizer, DeepSpeedZeroOptimizer):
        return None
    return lambda: ds_optimizer._global_grad_norm


def flat_layouts(ds_optimizer: Any, n_groups: int) -> list[FlatLayout | None]:
    """How DeepSpeed laid this rank's parameters out in the flat tensors the client optimizer sees."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    layouts: list[FlatLayout | None] = []
    for i in range(n_groups):
        if isinstance(ds_optimizer, DeepSpeedZeroOptimizer):  # ZeRO-1/2: per-tensor padding, partitioned
            group = ds_optimizer.real_dp_process_group[i]
            rank = torch.distributed.get_rank(group=group)
            size = int(ds_optimizer.partition_size[i])
            tensors = ds_optimizer.round_robin_bit16_groups[i]
            offsets = ds_optimizer.round_robin_bit16_offsets[i]
            layouts.append(FlatLayout.from_offsets([t.numel() for t in tensors], list(offsets), rank * size,
                                                   (rank + 1) * size, group))
        elif isinstance(ds_optimizer, BF16_Optimizer):  # contiguous, partitioned
            group = ds_optimizer.real_dp_process_group[i]
            world, rank = torch.distributed.get_world_size(group=group), torch.distributed.get_rank(group=group)
            size = ds_optimizer.bf16_groups_flat[i].numel() // world
            numels = [t.numel() for t in ds_optimizer.bf16_groups[i]]
            layouts.append(FlatLayout.from_offsets(numels, _running(numels), rank * size, (rank + 1) * size,
                                                   group))
        elif isinstance(ds_optimizer, FP16_Optimizer):  # contiguous, whole
            numels = [t.numel() for t in ds_optimizer.fp16_groups[i]]
            layouts.append(FlatLayout.from_offsets(numels, _running(numels), 0, sum(numels)))
        else:  # the client optimizer holds the real tensors
            layouts.append(None)
    return layouts


def _running(numels: list[int]) -> list[int]:
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += n
    return offsets
