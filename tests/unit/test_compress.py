"""1-bit packing and the error-compensated compressor, in one process (the multi-rank path: integration)."""

from __future__ import annotations

import torch

from pipeline.optim.compress import CompressedAllreduce, pack_signs, unpack_signs


def test_pack_unpack_round_trip():
    x = torch.randn(8 * 1001, generator=torch.Generator().manual_seed(0))
    x[::7] = 0.0  # zero counts as non-negative
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == x.numel() // 8
    assert torch.equal(unpack_signs(packed), torch.where(x >= 0, 1.0, -1.0))
    assert pack_signs(torch.tensor([1.0, -1, -1, -1, -1, -1, -1, -1])).item() == 128


def test_error_feedback_keeps_the_accumulated_error_bounded():
    """Sum over T steps of (compressed - true): bounded with feedback, growing without it."""
    gen = torch.Generator().manual_seed(1)
    with_feedback = CompressedAllreduce(1000)
    drift_feedback = torch.zeros(1000)
    drift_plain = torch.zeros(1000)
    for _ in range(300):
        x = torch.randn(1000, generator=gen) * 0.1 + 0.05
        drift_feedback += with_feedback(x) - x
        plain = unpack_signs(pack_signs(torch.cat([x, torch.zeros(0)]))) * (x.norm() / 1000 ** 0.5)
        drift_plain += plain - x
    assert drift_feedback.norm() < 0.05 * drift_plain.norm()
    assert drift_feedback.norm() <= (with_feedback.worker_error.norm() + 1e-4)  # exactly the carried error
