"""Error-compensated 1-bit compressed allreduce on torch.distributed (gloo on CPU, NCCL on GPU).

Written here because DeepSpeed removed its implementation (which also needed cupy and a GPU).
The algorithm is the one of 1-bit Adam (Tang et al., 2021), in two compressed hops:

  worker: x' = x + e_w; send sign(x') (1 bit each) and one scale ||x'|| / sqrt(n);  e_w = x' - scale*sign(x')
          the signs travel by all-to-all: rank r receives every worker's r-th chunk
  server: each rank averages its chunk over the workers, y' = y + e_s, and compresses it again the same
          way (e_s = y' - scale*sign(y')); an all-gather of the compressed chunks gives every rank
          the same averaged tensor.
The error buffers carry what compression dropped into the next call, so over many steps the
average of what was sent follows the average of the inputs (tested), and every rank ends each
call with bit-identical output. A call sends n/8 bytes of signs twice, instead of the 4n bytes
of an fp32 tensor, plus a few scales.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as tdist

BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per element (1 = non-negative), eight per byte, most significant first; numel % 8 == 0."""
    if x.device.type == "cpu":  # numpy's packbits is one C pass; the torch form below makes 3 tensors
        return torch.from_numpy(np.packbits((x.reshape(-1) >= 0).numpy()))
    bits = (x.reshape(-1, 8) >= 0).to(torch.uint8)
    weights = torch.tensor(BIT_WEIGHTS, dtype=torch.uint8, device=x.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def sign_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """Row b holds the eight +1/-1 values that byte b encodes."""
    byte = torch.arange(256, dtype=torch.int64).reshape(-1, 1)
    shifts = torch.arange(7, -1, -1, dtype=torch.int64)
    return (((byte >> shifts) & 1).float() * 2 - 1).to(device)


def unpack_signs(packed: torch.Tensor, table: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Back to +1/-1 floats, eight per byte, by table lookup (into `out` when given)."""
    table = sign_table(packed.device) if table is None else table
    rows = packed.reshape(-1).long()
    if out is None:
        return table.index_select(0, rows).reshape(-1)
    torch.index_select(table, 0, rows, out=out.reshape(-1, 8))
    return out


class CompressedAllreduce:
    """Averages a fixed-size tensor over the ranks of `group`, 1 bit per element, with error feedback.

    All working buffers are allocated once: on a CPU rank, faulting in fresh 100 MB tensors every
    step costs more than the arithmetic.
    """

    def __init__(self, numel: int, group=None, device: torch.device | str = "cpu"):
        self.group = group
        self.world = tdist.get_world_size(group) if tdist.is_initialized() else 1
        self.numel = numel
        self.padded = math.ceil(numel / (8 * self.world)) * 8 * self.world
        self.chunk = self.padded // self.world
        self.worker_error = torch.zeros(self.padded, device=device)
        self.server_error = torch.zeros(self.chunk, device=device)
        self.bytes_sent = 0  # by this rank, cumulative
        self._table = sign_table(device)
        self._buf = torch.zeros(self.padded, device=device)
        self._signs = torch.empty(self.padded, device=device)
        self._server = torch.empty(self.chunk, device=device)

    def state_dict(self) -> dict:
        return {"worker_error": self.worker_error.clone(), "server_error": self.server_error.clone(),
                "bytes_sent": self.bytes_sent}

    def load_state_dict(self, state: dict) -> None:
        self.worker_error.copy_(state["worker_error"])
        self.server_error.copy_(state["server_error"])
        self.bytes_sent = state["bytes_sent"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The average of `x` over the ranks (a view of an internal buffer: copy it before the next call)."""
        buf = self._buf
        buf[: self.numel].copy_(x.reshape(-1))
        buf[: self.numel].add_(self.worker_error[: self.numel])  # the padding stays 0
        packed, scale = self._compress(buf, self.worker_error, self._signs)
        if self.world == 1:
            return self._signs.mul_(scale)[: self.numel]
        received = torch.empty_like(packed)
        tdist.all_to_all_single(received, packed, group=self.group)
        scales = self._gather(scale.reshape(1))
        signs = unpack_signs(received, self._table, self._signs).reshape(self.world, self.chunk)
        server = torch.mv(signs.t(), scales, out=self._server).div_(self.world).add_(self.server_error)
        server_packed, server_scale = self._compress(server, self.server_error, self._signs[: self.chunk])
        all_packed = self._gather(server_packed)
        all_scales = self._gather(server_scale.reshape(1))
        out = unpack_signs(all_packed, self._table, self._signs).reshape(self.world, self.chunk)
        out.mul_(all_scales.reshape(-1, 1))
        share = (self.world - 1) / self.world
        self.bytes_sent += int(share * (packed.numel() + server_packed.numel() * self.world) + 8 * (self.world - 1))
        return out.reshape(-1)[: self.numel]

    def _compress(self, values: torch.Tensor, error: torch.Tensor,
                  scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signs and scale of `values`; `error` becomes what the 1-bit form leaves out."""
        scale = values.norm() / math.sqrt(values.numel())
        packed = pack_signs(values)
        signs = unpack_signs(packed, self._table, scratch)
        torch.mul(signs, -scale, out=error).add_(values)  # error = values - scale * sign(values)
        return packed, scale

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        tdist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group)
        return out
