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
        drift_feedback += with_feedback(x.clone()) - x  # in place: pass a copy
        plain = unpack_signs(pack_signs(torch.cat([x, torch.zeros(0)]))) * (x.norm() / 1000 ** 0.5)
        drift_plain += plain - x
    assert drift_feedback.norm() < 0.05 * drift_plain.norm()
    assert drift_feedback.norm() <= (with_feedback.worker_error.norm() + 1e-4)  # exactly the carried error


def test_frozen_elements_come_back_exactly_zero_and_carry_no_error():
    """A sign cannot say zero: frozen elements (no gradient in warmup) must not drift, whatever the others do."""
    gen = torch.Generator().manual_seed(2)
    comp = CompressedAllreduce(4096)
    frozen = torch.zeros(4096, dtype=torch.bool)
    frozen[1000:3000] = True
    drift = torch.zeros(4096)
    for _ in range(50):
        x = torch.randn(4096, generator=gen) * 0.1 + 0.05
        x[frozen] = 0.0
        out = comp(x.clone(), frozen=frozen)
        assert torch.equal(out[frozen], torch.zeros(2000))
        assert torch.equal(comp.worker_error[frozen], torch.zeros(2000))
        drift += out - x
    active = ~frozen
    # the scale is taken over the active elements only: their error stays as bounded as without a mask
    assert drift[active].norm() <= comp.worker_error[active].norm() + 1e-4
    unmasked = CompressedAllreduce(4096)
    x = torch.ones(4096)
    x[frozen] = 0.0
    assert unmasked(x.clone())[frozen].abs().min() > 0  # what happened before: zeros became +scale
