"""Measurements the plan's numbers are made of, taken the same way wherever they are taken.

The compute term is FLOPs / (peak x MFU). On a GPU the peak is the datasheet's; on a CPU no datasheet
says what torch reaches, so this machine's peak is a measured square fp32 matmul, and an MFU
benchmark reports its achieved FLOP/s against that same measurement taken in the same run.
"""

from __future__ import annotations

import time


def matmul_tflops(size: int = 2048, repeats: int = 8, trials: int = 5) -> float:
    """Best-of-`trials` fp32 rate of `repeats` square `size` matmuls on the current torch threads."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # first call pays for thread-pool start-up
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best / 1e12
