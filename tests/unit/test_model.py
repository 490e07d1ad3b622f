"""The sparse MLM head computes exactly the dense head's loss, and its gradients."""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig
from pipeline.model.bert import PretrainObjective, bert_config, build_model, train_flops_per_token


def _batch(vocab: int = 500, n: int = 4, seq: int = 32):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, seq), generator=gen)
    labels = torch.where(torch.rand(n, seq, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0  # some padding
    labels[0, 20:] = -100
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=labels)


def test_sparse_head_loss_and_grads_equal_dense():
    torch.manual_seed(0)
    model = build_model(bert_config(ModelConfig(preset="tiny", dropout=0.0), 500), pairs=False)
    sparse, dense = PretrainObjective(model, sparse=True), PretrainObjective(model, sparse=False)
    batch = _batch()
    out_s = sparse(**batch)
    grads_s = torch.autograd.grad(out_s.loss, list(model.parameters()))
    out_d = dense(**batch)
    grads_d = torch.autograd.grad(out_d.loss, list(model.parameters()))
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-6, atol=1e-6)
    assert out_s.correct == out_d.correct and out_s.masked == out_d.masked == (batch["labels"] != -100).sum()
    for gs, gd in zip(grads_s, grads_d):
        torch.testing.assert_close(gs, gd, rtol=1e-5, atol=1e-6)


def test_pretraining_heads_with_pairs():
    torch.manual_seed(0)
    model = build_model(bert_config(ModelConfig(preset="tiny"), 500), pairs=True)
    batch = _batch()
    out = PretrainObjective(model)(**batch, next_sentence_label=torch.tensor([0, 1, 0, 1]))
    assert out.nsp_loss is not None and torch.isclose(out.loss, out.mlm_loss + out.nsp_loss)


def test_sdpa_and_flops_accounting():
    config = bert_config(ModelConfig(preset="base"), 30522)
    model = build_model(config, pairs=False)
    assert model.config._attn_implementation == "sdpa"
    sparse = train_flops_per_token(config, 128, 0.15, sparse=True)
    dense = train_flops_per_token(config, 128, 0.15, sparse=False)
    non_embedding = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert 6 * non_embedding < sparse < dense  # the head saving is the vocab projection at 85% of positions
    assert abs((dense - sparse) - 6 * 0.85 * (768 * 768 + 768 * 30522)) < 1


def _counted_step_flops(objective, ids, labels) -> float:
    """FLOPs of one forward + backward as torch counts them (SDPA's math path, whose matmuls are visible)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = objective(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                        labels=labels)
        out.loss.backward()
    return float(counter.get_total_flops())


def test_training_flops_match_torchs_count_dense_pruned_and_with_a_layer_without_heads():
    from pipeline.model.bert import count_parameters, count_parameters_of, layer_widths
    from pipeline.model.prune import prune_model

    torch.manual_seed(0)
    config = bert_config(ModelConfig(preset="tiny", num_layers=3, num_heads=4, dropout=0.0), 300)
    seq, gen = 32, torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, seq), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]  # 16 of 64 positions masked: a mask fraction of 0.25
    plans = {"dense": None,
             "pruned": {"heads": [[0, 2], [], [0, 1, 2, 3]], "ffn": [list(range(0, 512, 2)), list(range(100)), []]}}
    for name, plan in plans.items():
        hf = build_model(config, pairs=False)
        if plan is not None:
            prune_model(hf, plan)
        objective = PretrainObjective(hf, sparse=True)
        counted = _counted_step_flops(objective, ids, labels)
        predicted = train_flops_per_token(config, seq, 0.25, sparse=True, widths=layer_widths(hf)) * ids.numel()
        assert abs(counted - predicted) <= 1e-6 * counted, (name, counted, predicted)
        assert count_parameters_of(config, layer_widths(hf)) == count_parameters(hf), name  # what plan sizes
    pruned_widths = layer_widths(hf)
    assert pruned_widths[1] == (0, 100) and pruned_widths[2] == (128, 0)  # no heads / no neurons left
