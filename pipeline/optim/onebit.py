"""1-bit Adam and 1-bit LAMB: full-precision warmup, then frozen variance and 1-bit momentum exchange.

Facts from the papers (Tang et al. 2021, 1-bit Adam; Li et al. 2021, 1-bit LAMB), code our own:
  warmup (steps 1..freeze_step): plain Adam / LAMB on gradients the DeepSpeed engine all-reduces;
  at freeze_step: the second moment v is frozen (it changes slowly once training is stable), and
      1-bit LAMB also freezes each layer's trust ratio (an average over the warmup);
  afterwards: the engine's gradient all-reduce is switched off (`enable_backward_allreduce`), each
      rank folds its local gradient into its momentum, and the momentum is averaged with the
      error-compensated 1-bit allreduce (compress.py): 1 bit per element on the wire instead of 32.
Every rank ends each step with bit-identical parameters (the averaged momentum is the same everywhere).
DeepSpeed's own checkpoint holds the shared state (moments, step, frozen ratios) from rank 0; the
error-feedback buffers differ per rank, so `rank_state_dict` goes into each rank's own file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.optim.compress import CompressedAllreduce

RATIO_AVERAGE = 0.98  # 1-bit LAMB: how slowly the warmup average of each layer's trust ratio moves


class OnebitOptimizer(torch.optim.Optimizer):
    """Shared machinery; `layerwise=True` is 1-bit LAMB, False is 1-bit Adam."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 freeze_step: int, layerwise: bool):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_ratio=True)
        super().__init__(params, defaults)
        self.freeze_step, self.layerwise = freeze_step, layerwise
        self.step_count = 0
        self.compressor: CompressedAllreduce | None = None
        self._set_allreduce: Callable[[bool], None] | None = None
        self._buffers_ready = False

    def _ensure_buffers(self) -> None:
        """Flat state over the parameters the optimizer holds *now*, on their device.

        Not done in __init__: DeepSpeed moves the model to the GPU after the optimizer is built,
        and its mixed-precision wrappers swap the parameters for fp32 copies.
        """
        if self._buffers_ready:
            return
        self.flat_params = [p for g in self.param_groups for p in g["params"]]
        sizes = [p.numel() for p in self.flat_params]
        device, total = self.flat_params[0].device, sum(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.exp_avg = torch.zeros(total, device=device)
        self.exp_avg_sq = torch.zeros(total, device=device)  # after freeze_step: sqrt(v_hat) + eps
        self.ratios = torch.ones(len(sizes), device=device)
        self._grad = torch.zeros(total, device=device)  # scratch, reused every step
        self._direction = torch.zeros(total, device=device)
        self._buffers_ready = True

    def attach(self, set_engine_allreduce: Callable[[bool], None]) -> None:
        """The engine's switch for its own gradient all-reduce: on in warmup, off once compressing."""
        self._set_allreduce = set_engine_allreduce
        self._set_allreduce(self.step_count < self.freeze_step)

    @property
    def compressing(self) -> bool:
        return self.step_count > self.freeze_step

    @property
    def bytes_sent(self) -> int:
        return self.compressor.bytes_sent if self.compressor is not None else 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._ensure_buffers()
        grad = self._gather_grads()
        if self.step_count == 0 and not grad.any():
            return loss  # DeepSpeed's mixed-precision wrapper "initialises state" with a zero-gradient step
        self.step_count += 1
        direction = self._direction
        beta1, beta2 = self.param_groups[0]["betas"]
        eps = self.param_groups[0]["eps"]
        self.exp_avg.lerp_(grad, 1 - beta1)
        if self.step_count <= self.freeze_step:
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            correction1, correction2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
            torch.div(self.exp_avg_sq, correction2, out=direction).sqrt_().add_(eps)
            torch.div(self.exp_avg, direction, out=direction).div_(correction1)
            if self.step_count == self.freeze_step:
                # frozen from here on: keep the denominator itself, sqrt(v_hat) + eps, computed once
                self.exp_avg_sq.div_(correction2).sqrt_().add_(eps)
        else:
            if self.compressor is None:
                self.compressor = CompressedAllreduce(self.exp_avg.numel(), device=self.exp_avg.device)
            self.exp_avg.copy_(self.compressor(self.exp_avg))
            torch.div(self.exp_avg, self.exp_avg_sq, out=direction)
        self._apply(direction)
        if self._set_allreduce is not None:
            self._set_allreduce(self.step_count < self.freeze_step)
        return loss

    def _gather_grads(self) -> torch.Tensor:
        """All gradients in one preallocated flat buffer (no per-step allocation)."""
        flat = self._grad
        for param, start in zip(self.flat_params, self.offsets):
            view = flat[start:start + param.numel()]
            if param.grad is None:
                view.zero_()
            else:
                view.copy_(param.grad.reshape(-1))
        return flat

    def _apply(self, direction: torch.Tensor) -> None:
        """p -= lr * ratio * (direction + wd * p), tensor by tensor; `direction` is scratch."""
        index = 0
        warmup = self.step_count <= self.freeze_step
        for group in self.param_groups:
            for param in group["params"]:
                start = self.offsets[index]
                update = direction[start:start + param.numel()].view_as(param)
                if group["weight_decay"]:
                    update.add_(param, alpha=group["weight_decay"])
                if self.layerwise and group["trust_ratio"]:
                    if warmup:
                        self._track_ratio(index, param, update)
                    update.mul_(self.ratios[index])
                param.add_(update.to(param.dtype), alpha=-group["lr"])
                index += 1

    def _track_ratio(self, index: int, param: torch.Tensor, update: torch.Tensor) -> None:
        w, u = param.float().norm(), update.norm()
        ratio = w / u if w > 0 and u > 0 else torch.ones((), device=w.device)
        first = self.step_count == 1
        self.ratios[index] = ratio if first else RATIO_AVERAGE * self.ratios[index] + (1 - RATIO_AVERAGE) * ratio

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "ratios": self.ratios, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                        for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        self._ensure_buffers()
        self.step_count = state["step_count"]
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.ratios.copy_(state["ratios"])
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        if self._set_allreduce is not None:
            self._set_allreduce(self.step_count < self.freeze_step)

    def rank_state_dict(self) -> dict:
        """What differs between ranks: the error-feedback buffers."""
        return {"compressor": self.compressor.state_dict() if self.compressor is not None else None}

    def load_rank_state_dict(self, state: dict) -> None:
        self._ensure_buffers()
        if state.get("compressor") is not None:
            self.compressor = CompressedAllreduce(self.exp_avg.numel(), device=self.exp_avg.device)
            self.compressor.load_state_dict(state["compressor"])


def onebit_adam(params, lr, betas, eps, weight_decay, freeze_step) -> OnebitOptimizer:
    return OnebitOptimizer(params, lr, betas, eps, weight_decay, freeze_step, layerwise=False)


def onebit_lamb(params, lr, betas, eps, weight_decay, freeze_step) -> OnebitOptimizer:
    return OnebitOptimizer(params, lr, betas, eps, weight_decay, freeze_step, layerwise=True)
