"""LAMB's flat-partition bookkeeping, checked without DeepSpeed: the same update as per-tensor LAMB."""

from __future__ import annotations

import torch

from pipeline.optim.lamb import FlatLayout, Lamb


def test_layout_from_offsets_cuts_partitions_at_tensor_boundaries():
    # tensors of 5, 3, 4 elements at offsets 0, 6, 10 (padding after the first); rank holds [4, 12)
    layout = FlatLayout.from_offsets([5, 3, 4], [0, 6, 10], 4, 12)
    assert layout.lengths == (1, 1, 3, 1, 2) and layout.owners == (0, -1, 1, -1, 2)
    whole = FlatLayout.from_offsets([5, 3], [0, 5], 0, 10)
    assert whole.lengths == (5, 3, 2) and whole.owners == (0, 1, -1)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4), (11,)]
    params = [torch.randn(s, generator=gen) * (i + 1) for i, s in enumerate(shapes)]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    return params, grads


def test_flat_lamb_with_layout_equals_per_tensor_lamb():
    params, grads = _tensors()
    real = [torch.nn.Parameter(p.clone()) for p in params]
    reference = Lamb([{"params": real}], lr=0.1, weight_decay=0.01)
    numels = [p.numel() for p in params]
    offsets = [0, 40, 48, 60]  # with padding gaps, as ZeRO aligns tensors
    flat = torch.nn.Parameter(torch.zeros(71 + 1))
    for p, off in zip(params, offsets):
        flat.data[off:off + p.numel()] = p.reshape(-1)
    flat_lamb = Lamb([{"params": [flat]}], lr=0.1, weight_decay=0.01)
    flat_lamb.set_layouts([FlatLayout.from_offsets(numels, offsets, 0, flat.numel())])
    naive = torch.nn.Parameter(flat.detach().clone())
    naive_lamb = Lamb([{"params": [naive]}], lr=0.1, weight_decay=0.01, per_tensor=False)
    for step_grads in grads:
        flat_grad = torch.zeros_like(flat)
        for p, g, off in zip(real, step_grads, offsets):
            p.grad = g.clone()
            flat_grad[off:off + g.numel()] = g.reshape(-1)
        flat.grad, naive.grad = flat_grad.clone(), flat_grad.clone()
        reference.step(), flat_lamb.step(), naive_lamb.step()
    for p, off in zip(real, offsets):
        torch.testing.assert_close(flat.data[off:off + p.numel()], p.data.reshape(-1), rtol=1e-6, atol=1e-7)
        assert not torch.allclose(naive.data[off:off + p.numel()], p.data.reshape(-1), atol=1e-4)


def test_groups_without_trust_ratio_are_plain_adam_with_decay_off():
    p = torch.nn.Parameter(torch.ones(4))
    opt = Lamb([{"params": [p], "weight_decay": 0.0, "trust_ratio": False}], lr=0.5)
    p.grad = torch.full((4,), 2.0)
    opt.step()
    torch.testing.assert_close(p.data, torch.full((4,), 0.5), rtol=1e-5, atol=1e-5)  # Adam's first step: lr*sign
