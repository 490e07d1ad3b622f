"""LAMB's flat-partition bookkeeping, checked without DeepSpeed: the same update as per-tensor LAMB."""

from __future__ import annotations

import pytest
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


def _reference_lamb(params, grads_per_step, lr, weight_decay, betas=(0.9, 0.999), eps=1e-6, clip=(0.01, 10.0)):
    """LAMB written out tensor by tensor from the formula in pipeline/optim/lamb.py's docstring."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            u = (m[i] / (1 - betas[0] ** step)) / ((v[i] / (1 - betas[1] ** step)).sqrt() + eps) + weight_decay * p
            ratio = (p.norm() / u.norm()).clamp(*clip)
            params[i] = p - lr * ratio * u
    return params


@pytest.mark.parametrize("foreach", [False, True])
def test_per_tensor_lamb_equals_the_formula(foreach):
    params, grads = _tensors()
    real = [torch.nn.Parameter(p.clone()) for p in params]
    lamb = Lamb([{"params": real}], lr=0.1, weight_decay=0.01, foreach=foreach)
    for step_grads in grads:
        for p, g in zip(real, step_grads):
            p.grad = g.clone()
        lamb.step()
    for got, want in zip(real, _reference_lamb(params, grads, lr=0.1, weight_decay=0.01)):
        torch.testing.assert_close(got.data, want, rtol=1e-5, atol=1e-6)


def test_a_tensor_that_sat_out_steps_keeps_its_own_bias_correction():
    params, grads = _tensors()
    real = [torch.nn.Parameter(p.clone()) for p in params]
    lamb = Lamb([{"params": real}], lr=0.1, weight_decay=0.0)
    for step, step_grads in enumerate(grads):
        for p, g in zip(real, step_grads):
            p.grad = None if (p is real[0] and step == 0) else g.clone()
        lamb.step()
    assert lamb.state[real[0]]["step"] == 2 and lamb.state[real[1]]["step"] == 3
    want = _reference_lamb(params[:1], grads[1:], lr=0.1, weight_decay=0.0)[0]
    torch.testing.assert_close(real[0].data, want, rtol=1e-5, atol=1e-6)


def _ops_in_step(num_layers: int) -> int:
    """Operators dispatched by one LAMB step over a stack of `num_layers` linear layers (+ LayerNorms)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(num_layers) for m in (torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))])
    from pipeline.optim.groups import param_groups

    lamb = Lamb(param_groups(model, 0.01), lr=0.1, foreach=True)  # the default on GPU tensors
    model(torch.randn(4, 8)).square().sum().backward()
    lamb.step()  # the first step also creates the state, tensor by tensor
    model(torch.randn(4, 8)).square().sum().backward()
    with Count():
        lamb.step()
    return Count.calls


def test_the_step_is_a_fixed_number_of_multi_tensor_operations_whatever_the_layer_count():
    few, many = _ops_in_step(2), _ops_in_step(12)
    assert few == many < 60, (few, many)  # a per-tensor loop would add ~10 operations per tensor


def test_clipping_in_the_step_equals_clipping_the_gradients_first():
    params, grads = _tensors()
    clipped = [torch.nn.Parameter(p.clone()) for p in params]
    lamb = Lamb([{"params": clipped}], lr=0.1, weight_decay=0.01)
    lamb.max_grad_norm = 1.0
    reference = []
    for step_grads in grads:
        for p, g in zip(clipped, step_grads):
            p.grad = g.clone()
        lamb.step()
        norm = torch.stack([g.norm() for g in step_grads]).norm()
        reference.append([g / max(1.0, float(norm + 1e-6)) for g in step_grads])
        torch.testing.assert_close(lamb.grad_norm, norm)
    for got, want in zip(clipped, _reference_lamb(params, reference, lr=0.1, weight_decay=0.01)):
        torch.testing.assert_close(got.data, want, rtol=1e-5, atol=1e-6)
    assert int(lamb.nonfinite_steps) == 0


def test_a_non_finite_gradient_moves_no_weight_and_is_counted():
    params, grads = _tensors()
    real = [torch.nn.Parameter(p.clone()) for p in params]
    lamb = Lamb([{"params": real}], lr=0.1, weight_decay=0.01)
    lamb.max_grad_norm = float("inf")  # no clipping, only the check
    for p, g in zip(real, grads[0]):
        p.grad = g.clone()
    lamb.step()
    before = [p.detach().clone() for p in real]
    for p, g in zip(real, grads[1]):
        p.grad = g.clone()
    real[2].grad[0, 0] = float("nan")
    lamb.step()
    assert all(torch.equal(a, b) for a, b in zip(before, real)) and int(lamb.nonfinite_steps) == 1
    assert all(torch.isfinite(s["exp_avg"]).all() and torch.isfinite(s["exp_avg_sq"]).all()
               for s in lamb.state.values())


def test_layouts_follow_their_group_when_zero_steps_one_group_at_a_time():
    """DeepSpeed's ZeRO-1/2 put one group at a time in param_groups and call step(): each group must still
    use its own layout (by position, the second group would get the first's)."""
    params, grads = _tensors()

    def flat_of(tensors):
        flat = torch.nn.Parameter(torch.cat([t.reshape(-1) for t in tensors]))
        layout = FlatLayout.from_offsets([t.numel() for t in tensors], [0, tensors[0].numel()], 0, flat.numel())
        return flat, layout
    results = []
    for one_at_a_time in (False, True):
        (a, layout_a), (b, layout_b) = flat_of(params[:2]), flat_of(params[2:])
        lamb = Lamb([{"params": [a]}, {"params": [b]}], lr=0.1)
        lamb.set_layouts([layout_a, layout_b])
        for step_grads in grads:
            a.grad = torch.cat([g.reshape(-1) for g in step_grads[:2]])
            b.grad = torch.cat([g.reshape(-1) for g in step_grads[2:]])
            if one_at_a_time:
                groups = lamb.param_groups
                for group in groups:
                    lamb.param_groups = [group]
                    lamb.step()
                lamb.param_groups = groups
            else:
                lamb.step()
        results.append(torch.cat([a.detach(), b.detach()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
