"""EarlyBERT pieces in pure torch: gates, masks, Hamming distance, the FIFO rule, exact structural pruning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ModelConfig, SearchConfig
from pipeline.earlybird import (
    EarlyBirdDetector,
    Masks,
    draw_masks,
    hamming,
    keep_mask,
    random_like,
    random_masks,
    ticket_masks,
)
from pipeline.model.bert import bert_config, build_model
from pipeline.model.gates import gates_for
from pipeline.model.prune import fold_gates, load_pruned, plan_summary, prune_model, save_pruned


def _model(layers: int = 3, heads: int = 4):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", dropout=0.0, num_layers=layers, num_heads=heads)
    return build_model(bert_config(cfg, 300), pairs=False).eval()


def _inputs():
    ids = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_gates_at_one_change_nothing():
    model = _model()
    before = model(**_inputs()).logits
    gates_for(model)
    assert torch.equal(model(**_inputs()).logits, before)


def test_masks_layerwise_and_global():
    coef = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.05]])
    layerwise = keep_mask(coef, 0.5, "layerwise")
    assert layerwise.tolist() == [[True, False, True, False], [False, True, True, False]]
    global_ = keep_mask(coef, 0.25, "global")  # the 2 smallest of 8 overall
    assert global_.tolist() == [[True, False, True, True], [True, True, True, False]]
    assert keep_mask(-coef, 0.5, "layerwise").tolist() == layerwise.tolist()  # by magnitude
    rand = random_masks(SearchConfig(), (12, 12), (12, 3072), seed=0)
    assert rand.heads.sum(1).tolist() == [8] * 12 and int(rand.ffn.sum()) == round(0.6 * 12 * 3072)


def test_ffn_widths_rounded_to_a_multiple_keep_each_layers_highest_scores():
    gen = torch.Generator().manual_seed(3)
    coef = torch.rand(12, 3072, generator=gen) * torch.linspace(0.5, 1.5, 12).unsqueeze(1)  # layers differ
    plain = keep_mask(coef, 0.4, "global")
    rounded = keep_mask(coef, 0.4, "global", multiple=64)
    counts = rounded.sum(1)
    assert (counts % 64 == 0).all() and not (plain.sum(1) % 64 == 0).all()
    assert ((counts - plain.sum(1)).abs() <= 32).all()  # each layer moves to its nearest multiple
    for row, kept in zip(coef, rounded):  # every kept neuron outscores every dropped one in its layer
        assert row[kept].min() > row[~kept].max()
    assert torch.equal(keep_mask(coef, 0.4, "global", multiple=1), plain)
    ticket = random_masks(SearchConfig(ffn_multiple=64), (12, 12), (12, 3072), seed=0)
    assert (ticket.ffn.sum(1) % 64 == 0).all() and ticket.heads.sum(1).tolist() == [8] * 12


def _masks(bits: list[int]) -> Masks:
    t = torch.tensor(bits, dtype=torch.bool)
    return Masks(t[:4].reshape(1, 4), t[4:].reshape(1, -1))


def test_hamming_is_kept_apart_for_heads_and_ffn():
    a, b = _masks([1, 1, 0, 0, 1, 1, 1, 1, 0, 0]), _masks([1, 0, 1, 0, 1, 1, 1, 1, 0, 0])
    assert hamming(a, a) == (0.0, 0.0)
    heads, ffn = hamming(a, b)
    assert abs(heads - 0.5) < 1e-6 and ffn == 0.0  # 2 of 4 heads differ, no neuron


def test_fifo_rule_emerges_exactly_when_the_window_is_full_and_stable():
    a, b = _masks([1, 1, 0, 0, 1, 1, 1, 1, 0, 0]), _masks([1, 1, 0, 0, 1, 1, 1, 0, 1, 0])  # 2 of 6 neurons
    detector = EarlyBirdDetector(fifo_size=3, head_threshold=0.1, ffn_threshold=0.1)
    assert not detector.push(a) and not detector.push(a)  # identical, but the FIFO is not full yet
    assert detector.push(a)  # a a a: full and stable
    detector = EarlyBirdDetector(fifo_size=3, head_threshold=0.1, ffn_threshold=0.1)
    pushed = [detector.push(m) for m in (a, b, a, a, a)]
    assert pushed == [False, False, False, False, True]  # b leaves the window only at the fifth push
    assert detector.ffn_history[2] > 0.3 and detector.ffn_history[-1] == 0.0


def test_no_ticket_while_the_head_mask_keeps_changing_under_a_stable_ffn_mask():
    """BERT-base proportions: 144 head gates, 36,864 FFN gates. The FFN mask never changes; each check
    swaps the pruned heads of one layer (4 of 144 heads = 2.8%). A single distance over all gates moves
    by 4 / 37,008 = 0.01% and would call this a ticket; the head distance does not."""
    gen = torch.Generator().manual_seed(0)
    ffn = keep_mask(torch.rand(12, 3072, generator=gen), 0.4, "global")
    head_scores = torch.rand(12, 12, generator=gen)
    detector = EarlyBirdDetector(fifo_size=5, head_threshold=0.01, ffn_threshold=0.01)
    emerged, previous = [], None
    for check in range(30):
        layer = check % 12
        head_scores[layer] = torch.rand(12, generator=gen)  # this layer's ranking reshuffled
        masks = Masks(keep_mask(head_scores, 1 / 3, "layerwise"), ffn)
        emerged.append(detector.push(masks))
        flat = torch.cat([masks.heads.reshape(-1), masks.ffn.reshape(-1)])
        if previous is not None:
            assert float((flat != previous).float().mean()) < 0.001  # what the old single distance saw
        previous = flat
    assert not any(emerged)
    assert max(detector.ffn_history[1:]) == 0.0 and min(detector.head_history[1:]) > 0.01


def test_synthetic_coefficient_stream_emerges_once_the_ranking_settles():
    gen = torch.Generator().manual_seed(0)
    target_heads, target_ffn = torch.rand(2, 12, generator=gen), torch.rand(2, 64, generator=gen)
    detector = EarlyBirdDetector(5, 0.1, 0.1)
    results = []
    for step in range(40):
        noise = 1.0 if step < 10 else 0.0  # a ranking that moves a lot, then holds still
        masks = draw_masks(target_heads + torch.randn(2, 12, generator=gen) * noise,
                           target_ffn + torch.randn(2, 64, generator=gen) * noise, 1 / 3, 0.4)
        results.append(detector.push(masks))
    assert not any(results[:10])  # refused while the ranking moves
    assert results.index(True) == 14  # pushes 10..14: the first window of 5 holding only the settled mask
    assert all(results[14:])


def test_pruning_is_exact_even_for_layers_left_empty():
    model = _model()
    gates = gates_for(model)
    with torch.no_grad():
        gates.heads.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(2))
        gates.ffn.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(3))
        gates.heads[1] = 0.01  # global pruning takes all of layer 1's heads ...
        gates.ffn[2] = 0.01  # ... and all of layer 2's neurons
    masks = draw_masks(gates.heads, gates.ffn, 4 / 12, 512 / 1536, "global", "global")
    assert not masks.heads[1].any() and not masks.ffn[2].any()
    with torch.no_grad():
        gates.heads.mul_(masks.heads)
        gates.ffn.mul_(masks.ffn)
    gated = model(**_inputs()).logits
    gates.detach()
    fold_gates(model, gates)
    plan = masks.to_plan()
    prune_model(model, plan)
    torch.testing.assert_close(model(**_inputs()).logits, gated, rtol=1e-5, atol=1e-5)
    summary = plan_summary(plan, model.config)
    assert summary["layers_without_heads"] == 1 and summary["layers_without_ffn"] == 1


def test_save_and_load_pruned(tmp_path):
    model = _model()
    plan = {"heads": [[0, 2], [1, 2, 3], []], "ffn": [list(range(0, 512, 2)), list(range(100)), []]}
    prune_model(model, plan)
    expected = model(**_inputs()).logits
    save_pruned(model, plan, tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))  # plain safetensors, readable by any tool
    assert tensors["bert.encoder.layer.0.attention.self.query.weight"].shape == (2 * 32, 128)  # 2 heads of 32
    assert tensors["bert.encoder.layer.2.intermediate.dense.weight"].shape == (0, 128)
    reloaded = load_pruned(tmp_path / "m").eval()
    assert torch.equal(reloaded(**_inputs()).logits, expected)


@pytest.mark.parametrize("ffn_scope", ["layerwise", "global"])
def test_searched_and_random_tickets_follow_the_same_size_rules(ffn_scope):
    """Both kinds come from one function of the search config: the FFN multiple applies to the random ticket
    too (fine-tuning's random ticket once left it out and came out another size than the searched one)."""
    rules = SearchConfig(ffn_multiple=64, ffn_scope=ffn_scope)
    gen = torch.Generator().manual_seed(5)
    layers_differ = torch.linspace(0.5, 1.5, 12)[:, None]
    gates = (torch.rand(12, 12, generator=gen), torch.rand(12, 3072, generator=gen) * layers_differ)
    searched, rand = ticket_masks(rules, *gates), random_masks(rules, (12, 12), (12, 3072), seed=1)
    assert searched.heads.sum(1).tolist() == rand.heads.sum(1).tolist() == [8] * 12
    assert (searched.ffn.sum(1) % 64 == 0).all() and (rand.ffn.sum(1) % 64 == 0).all()
    if ffn_scope == "layerwise":
        assert searched.ffn.sum(1).tolist() == rand.ffn.sum(1).tolist()
    like = random_like(searched, seed=2)  # exactly the searched ticket's per-layer counts, whatever the scope
    assert like.heads.sum(1).tolist() == searched.heads.sum(1).tolist()
    assert like.ffn.sum(1).tolist() == searched.ffn.sum(1).tolist()
    assert not torch.equal(like.ffn, searched.ffn) and torch.equal(random_like(searched, seed=2).ffn, like.ffn)
