"""1-bit Adam and 1-bit LAMB: a full-precision warmup, then frozen variance and 1-bit momentum exchange.

Facts from the papers (Tang et al. 2021, 1-bit Adam; Li et al. 2021, 1-bit LAMB), code our own.
  warmup (steps 1..freeze_step): exactly the full-precision optimizer on the gradients the
      DeepSpeed engine all-reduces: torch's fused AdamW for 1-bit Adam, this project's LAMB (clipped
      per-layer trust ratios) for 1-bit LAMB, which also keeps a running average of each layer's ratio.
  at freeze_step: the second moment is frozen (it changes slowly once training is stable) and the
      engine's gradient all-reduce is switched off (`enable_backward_allreduce`).
  afterwards: each rank folds its local gradient into its momentum and the momentum is averaged by
      the error-compensated 1-bit allreduce (compress.py): 1 bit per element on the wire instead of 32.
      1-bit Adam: w -= lr * m_hat / (sqrt(v_frozen) + eps), decoupled weight decay as AdamW.
      1-bit LAMB (the paper's Algorithm 1): momentum scaled per layer before compression (one scale
          per call would otherwise be set by the largest layers); a fresh variance reconstructed from
          the averaged momentum; each layer's step is its frozen average trust ratio times an
          adaptive factor max(denominator_frozen / denominator_fresh), mixed toward 1 by the
          weight-decay share of the update, clamped to [factor_min, factor_max] and moved at most
          factor_threshold (relative) per step.
The momentum's bias correction 1 / (1 - beta1^t) applies in both stages, so the step does not jump at
the switch. Elements that had no gradient during the warmup (position rows past the sequence
length, token-type row 1 under MLM-only data, unused vocab rows) have a frozen variance of exactly
0: the compressor keeps their momentum at exactly 0, so only weight decay moves them, as in the
full-precision optimizers. They stay frozen for the rest of the phase (a new phase, e.g. at a longer
sequence, warms up afresh).
Memory per parameter: warmup 8 bytes (m, v in fp32, as Adam); afterwards m (4), the frozen variance
in bf16 (2: a fixed preconditioner, its 8-bit mantissa moves a step by < 0.2%), the worker error (4),
the server error (4/ranks), and for LAMB the fresh variance (4). The gradient buffer, consumed by
then, is the scratch space. Every rank takes the same branches: nothing here decides from its own
values before a collective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as tdist
from torch.optim.adamw import adamw

from pipeline.optim.compress import CompressedAllreduce, padded_size
from pipeline.optim.lamb import adam_directions, clip_gradients, count_nonfinite, tensor_ratios


class OnebitOptimizer(torch.optim.Optimizer):
    """Flat moment buffers (one per optimizer, with per-tensor views) shared by 1-bit Adam and LAMB."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 freeze_step: int):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_ratio=True)
        super().__init__(params, defaults)
        self.freeze_step = freeze_step
        self.step_count = 0
        self.compressor: CompressedAllreduce | None = None
        self._set_allreduce: Callable[[bool], None] | None = None
        self._buffers_ready = False
        self._finite: torch.Tensor | None = None  # this step's "gradient norm was finite" (1.0/0.0), if clipped here

    def _ensure_buffers(self) -> None:
        """Flat state over the parameters the optimizer holds *now*, on their device.

        Not done in __init__: DeepSpeed moves the model to the GPU after the optimizer is built,
        and its mixed-precision wrapper swaps the parameters for fp32 copies.
        """
        if self._buffers_ready:
            return
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.groups = [g for g in self.param_groups for _ in g["params"]]
        sizes = [p.numel() for p in self.params]
        world = tdist.get_world_size() if tdist.is_initialized() else 1
        self.numel, device = sum(sizes), self.params[0].device
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        padded = padded_size(self.numel, world)  # the compressor's length; the padding stays 0
        self.exp_avg = torch.zeros(padded, device=device)
        self.exp_avg_sq: torch.Tensor | None = torch.zeros(padded, device=device)  # LAMB: fresh after freeze
        self.frozen_sq: torch.Tensor | None = None  # v_hat at the freeze, bf16
        self._buffers_ready = True

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]

    def set_layouts(self, layouts: list) -> None:
        if any(layout is not None for layout in layouts):
            raise ValueError("1-bit optimizers need whole tensors: use ZeRO stage 0 (the engine checks this)")

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

    def _grads(self) -> list[torch.Tensor]:
        """Each parameter's fp32 gradient; a missing one becomes zeros (the same work on every rank)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._ensure_buffers()
        self.step_count += 1
        grads = self._grads()
        self._finite = self._clip(grads)
        if self.step_count <= self.freeze_step:
            self._warmup_step(grads)
            if self.step_count == self.freeze_step:
                self._freeze()
        else:
            self._compressed_step(grads)
        if self._set_allreduce is not None:
            self._set_allreduce(self.step_count < self.freeze_step)
        return loss

    def _freeze(self) -> None:
        correction2 = 1 - self.param_groups[0]["betas"][1] ** self.step_count
        self.exp_avg_sq.div_(correction2)  # v_hat: from here on no longer bias-corrected
        self.frozen_sq = self.exp_avg_sq.to(torch.bfloat16)

    def _denominators(self):
        """sqrt(v_frozen) + eps per tensor (the same on every rank), one at a time.

        Rebuilt where needed rather than kept: on CPU, holding (page-faulting) a parameter-sized
        buffer for the whole step measured slower than recomputing them.
        """
        for v, group in zip(self.views(self.frozen_sq), self.groups):
            yield v.float().sqrt_().add_(group["eps"])

    def _average_momentum(self, layer_scales: torch.Tensor | None = None) -> None:
        """The momentum averaged over the ranks at 1 bit per element, in the frozen preconditioner's units.

        The frozen denominator is the same on every rank, so averaging m / denom and multiplying back
        is the same average; but the sign compressor's error is then spread in units of the step
        itself (Adam's steps are all of similar size), not of the raw momentum, whose magnitudes
        differ by orders between a frequent token's row and a rare one's, where sqrt(v) is tiny and
        one scale for all would turn the rare row's compression error into a huge step.
        """
        if self.compressor is None:
            self.compressor = CompressedAllreduce(self.numel, device=self.exp_avg.device)
        moments = self.views(self.exp_avg)
        scales = [None] * len(moments) if layer_scales is None else layer_scales
        for m, denom, scale in zip(moments, self._denominators(), scales):
            m.div_(denom)
            if scale is not None:
                m.mul_(scale)
        self.compressor(self.exp_avg, frozen=self.frozen_sq == 0)
        for m, denom, scale in zip(moments, self._denominators(), scales):
            if scale is not None:
                m.div_(scale)
            m.mul_(denom)

    def _clip(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """Clipping inside the step: none here (DeepSpeed clips, as for AdamW); 1-bit LAMB does, as LAMB."""
        return None

    def _correction1(self) -> float:
        return 1 - self.param_groups[0]["betas"][0] ** self.step_count

    def _warmup_step(self, grads: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _compressed_step(self, grads: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        self._ensure_buffers()
        return {"step_count": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "frozen_sq": self.frozen_sq, **self._extra_state(),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        self._ensure_buffers()
        self.step_count = state["step_count"]
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq = None if state["exp_avg_sq"] is None else state["exp_avg_sq"].to(self.exp_avg.device)
        self.frozen_sq = None if state["frozen_sq"] is None else state["frozen_sq"].to(self.exp_avg.device)
        for key in self._extra_state():
            setattr(self, key, state[key].to(self.exp_avg.device))
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
            self.compressor = CompressedAllreduce(self.numel, device=self.exp_avg.device)
            self.compressor.load_state_dict(state["compressor"])

    def state_bytes(self) -> int:
        """Bytes of every tensor this optimizer keeps between steps (parameters and gradients excluded)."""
        held = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        if self.compressor is not None:
            held += [v for v in vars(self.compressor).values() if isinstance(v, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
        return sum(storages.values())


class OnebitAdam(OnebitOptimizer):
    def _warmup_step(self, grads: list[torch.Tensor]) -> None:
        """torch's fused AdamW kernel (the one `optimizer.name: adamw` runs), on views of the flat moments."""
        beta1, beta2 = self.param_groups[0]["betas"]
        moments, variances, start = self.views(self.exp_avg), self.views(self.exp_avg_sq), 0
        for group in self.param_groups:  # self.params holds the groups' tensors in order
            held = slice(start, start + len(group["params"]))
            start = held.stop
            # the kernel's step counters, one per tensor (views of one allocation), advanced before use
            steps = list(torch.full((held.stop - held.start,), float(self.step_count - 1),
                                    device=self.exp_avg.device).unbind())
            adamw(self.params[held], grads[held], moments[held], variances[held], [], steps, fused=True,
                  amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=False)

    def _freeze(self) -> None:
        super()._freeze()
        self.exp_avg_sq = None  # Adam needs only the frozen copy

    def _compressed_step(self, grads: list[torch.Tensor]) -> None:
        beta1 = self.param_groups[0]["betas"][0]
        for m, g in zip(self.views(self.exp_avg), grads):
            m.lerp_(g, 1 - beta1)
        self._average_momentum()
        correction1 = self._correction1()
        for p, g, m, v, group in zip(self.params, grads, self.views(self.exp_avg), self.views(self.frozen_sq),
                                     self.groups):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            denom = g.copy_(v).sqrt_().add_(group["eps"])  # the consumed gradient is the scratch
            p.addcdiv_(m, denom, value=-group["lr"] / correction1)


class OnebitLamb(OnebitOptimizer):
    def __init__(self, params, lr, betas, eps, weight_decay, freeze_step, trust_ratio_clip=(0.01, 10.0),
                 coeff_beta: float = 0.9, factor_min: float = 0.5, factor_max: float = 4.0,
                 factor_threshold: float = 0.1):
        super().__init__(params, lr, betas, eps, weight_decay, freeze_step)
        self.trust_ratio_clip, self.coeff_beta = trust_ratio_clip, coeff_beta
        self.factor_min, self.factor_max, self.factor_threshold = factor_min, factor_max, factor_threshold
        self.max_grad_norm = 0.0  # set by the engine: clipping in the step, as LAMB (lamb.clip_gradients)
        self.grad_norm: torch.Tensor | None = None
        self.nonfinite_steps: torch.Tensor | None = None

    def _clip(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        if not self.max_grad_norm:
            return None
        # whole tensors (stage 0): the local norm; after the freeze, of this rank's own gradient, as
        # DeepSpeed's clipping had it then
        finite, self.grad_norm = clip_gradients(grads, self.max_grad_norm, [])
        self.nonfinite_steps = count_nonfinite(self.nonfinite_steps, finite)
        return finite

    def _ensure_buffers(self) -> None:
        if self._buffers_ready:
            return
        super()._ensure_buffers()
        n, device = len(self.params), self.exp_avg.device
        self.coeff_avg = torch.zeros(n, device=device)  # running average of each tensor's trust ratio
        self.coeff_frozen = torch.ones(n, device=device)
        self.last_factor = torch.ones(n, device=device)
        self.momentum_scale = torch.ones(n, device=device)  # per-tensor scaling before compression

    def _extra_state(self) -> dict:
        return {k: getattr(self, k) for k in ("coeff_avg", "coeff_frozen", "last_factor", "momentum_scale")}

    def _adapts(self, group: dict) -> bool:
        return bool(group["trust_ratio"])  # biases and LayerNorm: no layer adaptation, as in LAMB

    def _warmup_step(self, grads: list[torch.Tensor]) -> None:
        """This project's LAMB, through the same functions; and the running average of each ratio."""
        beta, start = self.coeff_beta, 0
        moments, variances = self.views(self.exp_avg), self.views(self.exp_avg_sq)
        for group in self.param_groups:  # self.params holds the groups' tensors in order
            held = slice(start, start + len(group["params"]))
            start = held.stop
            params = self.params[held]
            if not params:
                continue
            updates = adam_directions(params, grads[held], moments[held], variances[held], self.step_count, group,
                                      outs=grads[held])
            if self._adapts(group):
                ratios = tensor_ratios(params, updates, self.trust_ratio_clip)
                torch._foreach_mul_(updates, list(ratios.unbind()))
                self.coeff_avg[held] = beta * self.coeff_avg[held] + (1 - beta) * ratios
            if self._finite is not None:  # a non-finite gradient moves no weight
                torch._foreach_mul_(updates, self._finite)
            torch._foreach_add_(params, [u.to(p.dtype) for p, u in zip(params, updates)], alpha=-group["lr"])

    def _freeze(self) -> None:
        super()._freeze()  # exp_avg_sq goes on as the fresh variance, from v_hat
        self.coeff_frozen = self.coeff_avg / (1 - self.coeff_beta ** self.step_count)  # bias-corrected average
        # Li et al.'s per-layer momentum scaling, taken here in the preconditioned units that are compressed
        scales = torch.stack([m.div(denom).norm() / m.numel() ** 0.5
                              for m, denom in zip(self.views(self.exp_avg), self._denominators())])
        united = scales[scales > 0].mean() if bool((scales > 0).any()) else torch.ones(())
        self.momentum_scale = torch.where(scales > 0, united / scales.clamp(min=1e-30), torch.ones_like(scales))

    def _compressed_step(self, grads: list[torch.Tensor]) -> None:
        beta1 = self.param_groups[0]["betas"][0]
        moments = self.views(self.exp_avg)
        for m, g in zip(moments, grads):
            m.mul_(beta1).add_(g, alpha=1 - beta1)  # the local momentum
            g.mul_(beta1 - 1).add_(m)  # the gradient buffer now holds beta1 * m_prev
        self._average_momentum(self.momentum_scale)
        for m, g in zip(moments, grads):
            g.neg_().add_(m).div_(1 - beta1)  # the gradient the averaged momentum implies
        self._apply(grads)

    def _apply(self, grads: list[torch.Tensor]) -> None:
        beta2 = self.param_groups[0]["betas"][1]
        correction1 = self._correction1()
        for i, (p, g, m, fresh, frozen, group) in enumerate(zip(
                self.params, grads, self.views(self.exp_avg), self.views(self.exp_avg_sq),
                self.views(self.frozen_sq), self.groups)):
            fresh.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = g.copy_(frozen).sqrt_().add_(group["eps"])
            factor = (denom / fresh.sqrt().add_(group["eps"])).max()
            update = torch.div(m, denom, out=g).div_(correction1)
            prelim = update.norm()
            if group["weight_decay"]:
                update.add_(p, alpha=group["weight_decay"])
            keep = 1.0 if self._finite is None else self._finite  # a non-finite gradient moves no weight
            if not self._adapts(group):
                p.add_(update.mul_(keep), alpha=-group["lr"])
                continue
            if group["weight_decay"]:  # the decay's share of the step is not the variance's business
                share = torch.clamp(prelim / update.norm().clamp(min=1e-30), max=1.0)
                factor = factor * share + (1 - share)
            last = self.last_factor[i]
            factor = factor.clamp(self.factor_min, self.factor_max)
            factor = torch.minimum(torch.maximum(factor, last * (1 - self.factor_threshold)),
                                   last * (1 + self.factor_threshold))
            self.last_factor[i] = factor
            p.add_(update.mul_(self.coeff_frozen[i] * factor * keep), alpha=-group["lr"])


def onebit_adam(params, lr, betas, eps, weight_decay, freeze_step) -> OnebitAdam:
    return OnebitAdam(params, lr, betas, eps, weight_decay, freeze_step)


def onebit_lamb(params, lr, betas, eps, weight_decay, freeze_step, **lamb) -> OnebitLamb:
    return OnebitLamb(params, lr, betas, eps, weight_decay, freeze_step, **lamb)
