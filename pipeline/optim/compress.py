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

A sign cannot say "zero": elements named by `frozen` (e.g. embedding rows that never had a
gradient) are left out of the scales, and come back as exact zeros with zero error, so they
never drift. Memory: the two error buffers (4 + 4/world bytes per element) are the only state;
the packed signs (1/8 byte per element) are allocated per call and everything else is done in
place, block by block, so no fp32 sign buffer of the tensor's size exists.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as tdist

BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
BLOCK = 1 << 18  # elements unpacked at a time: bounds the fp32 scratch to 1 MB whatever the model


def padded_size(numel: int, world: int) -> int:
    """Length the compressed tensor is padded to: whole bytes of signs in every rank's chunk."""
    return math.ceil(numel / (8 * world)) * 8 * world


def bytes_per_call(numel: int, world: int) -> int:
    """What one call hands the collectives from each rank (what `bytes_sent` counts): the packed signs
    by all-to-all and by all-gather, (world-1)/world of the padded length / 8 each, and 2 scales."""
    if world == 1:
        return 0
    signs = padded_size(numel, world) // 8
    return 2 * signs * (world - 1) // world + 2 * 4 * (world - 1)


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
    """Averages a fixed-size flat tensor over the ranks of `group`, in place, 1 bit per element."""

    def __init__(self, numel: int, group=None, device: torch.device | str = "cpu"):
        self.group = group
        self.world = tdist.get_world_size(group) if tdist.is_initialized() else 1
        self.rank = tdist.get_rank(group) if tdist.is_initialized() else 0
        self.numel = numel
        self.padded = padded_size(numel, self.world)
        self.chunk = self.padded // self.world
        self.worker_error = torch.zeros(self.padded, device=device)
        self.server_error = torch.zeros(self.chunk, device=device)
        self.bytes_sent = 0  # by this rank, cumulative: what the collectives were handed, not a formula
        self._table = sign_table(device)
        self._scratch: torch.Tensor | None = None  # one block of unpacked signs, only during a call

    def state_dict(self) -> dict:
        return {"worker_error": self.worker_error.clone(), "server_error": self.server_error.clone(),
                "bytes_sent": self.bytes_sent}

    def load_state_dict(self, state: dict) -> None:
        self.worker_error.copy_(state["worker_error"])
        self.server_error.copy_(state["server_error"])
        self.bytes_sent = state["bytes_sent"]

    def __call__(self, x: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """Replace `x` (flat, `padded` long, fp32) by its average over the ranks; returns `x`.

        `frozen` (bool, `padded` long, the same on every rank): elements that are exactly 0 on output.
        The padding past `numel` must be 0 and frozen (the optimizer's buffers are laid out so).
        """
        self._scratch = torch.empty(min(BLOCK, self.padded), device=x.device)
        try:
            return self._average(x, frozen)
        finally:
            self._scratch = None

    def _average(self, x: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
        error = self.worker_error.add_(x)  # x' = x + e_w, built in the error buffer itself
        scale = self._compress(error, frozen)
        packed = pack_signs(error)
        self._subtract_signs(error, packed, scale, frozen)  # e_w = x' - scale * sign(x')
        if self.world == 1:
            return self._expand(x, packed, scale.reshape(1), frozen)
        received = torch.empty_like(packed)
        self._all_to_all(received, packed)
        scales = self._all_gather(scale.reshape(1))
        server = self.server_error  # y' = mean over workers of my chunk + e_s, built in place
        lo = self.rank * self.chunk
        mine = None if frozen is None else frozen[lo:lo + self.chunk]
        per_worker = self.chunk // 8
        for worker in range(self.world):
            signs = received[worker * per_worker:(worker + 1) * per_worker]
            self._add_signs(server, signs, scales[worker] / self.world)
        server_scale = self._compress(server, mine)
        server_packed = pack_signs(server)
        self._subtract_signs(server, server_packed, server_scale, mine)
        gathered = received  # reused: the all-to-all's signs are consumed
        self._all_gather(server_packed, out=gathered)
        server_scales = self._all_gather(server_scale.reshape(1))
        return self._expand(x, gathered, server_scales, frozen)

    @staticmethod
    def _compress(values: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
        """The scale ||values|| / sqrt(active elements), with frozen elements zeroed first."""
        if frozen is None:
            return values.norm() / math.sqrt(values.numel())
        values.masked_fill_(frozen, 0.0)
        active = values.numel() - int(frozen.sum())
        return values.norm() / math.sqrt(max(active, 1))

    def _blocks(self, n: int):
        for start in range(0, n, BLOCK):
            yield start, min(start + BLOCK, n)

    def _subtract_signs(self, values: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                        frozen: torch.Tensor | None) -> None:
        for lo, hi in self._blocks(values.numel()):
            signs = unpack_signs(packed[lo // 8:hi // 8], self._table, self._scratch[:hi - lo])
            values[lo:hi].sub_(signs.mul_(scale))
        if frozen is not None:
            values.masked_fill_(frozen, 0.0)

    def _add_signs(self, values: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> None:
        for lo, hi in self._blocks(values.numel()):
            signs = unpack_signs(packed[lo // 8:hi // 8], self._table, self._scratch[:hi - lo])
            values[lo:hi].add_(signs.mul_(scale))

    def _expand(self, x: torch.Tensor, signs_all: torch.Tensor, scales: torch.Tensor,
                frozen: torch.Tensor | None) -> torch.Tensor:
        """x = scale_w * sign, chunk w by chunk w, from the all-gathered signs."""
        chunk = self.padded // scales.numel()
        for worker in range(scales.numel()):
            part = x[worker * chunk:(worker + 1) * chunk]
            part.zero_()
            self._add_signs(part, signs_all[worker * chunk // 8:(worker + 1) * chunk // 8], scales[worker])
        if frozen is not None:
            x.masked_fill_(frozen, 0.0)
        return x

    def _all_to_all(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        tdist.all_to_all_single(out, tensor, group=self.group)
        self.bytes_sent += tensor.numel() * tensor.element_size() * (self.world - 1) // self.world

    def _all_gather(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        tdist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group)
        # what a ring all-gather sends from each rank: its piece to each of the others, once
        self.bytes_sent += tensor.numel() * tensor.element_size() * (self.world - 1)
        return out
