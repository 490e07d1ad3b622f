"""Counting what a step reads back to the host: each such operation is a device sync on a GPU."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result the host must read: scalars out of tensors, data-dependent shapes
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
