"""The pretraining step with fixed-count masking: static shapes, no host syncs, one compiled graph."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import MaskingConfig, ModelConfig
from pipeline.data.loader import static_padding_mask
from pipeline.data.masking import mask_tokens, masked_positions, positions_per_row
from pipeline.data.tokenizer import TokenizerInfo
from pipeline.model.bert import PretrainObjective, bert_config, build_model, compile_whole
from tests.syncs import SyncCounter

VOCAB, SEQ = 500, 64


def _objective(seed: int = 0) -> PretrainObjective:
    torch.manual_seed(seed)
    return PretrainObjective(build_model(bert_config(ModelConfig(preset="tiny", num_layers=1, dropout=0.0,
                                                                 max_position_embeddings=SEQ), VOCAB), pairs=False))


def _batch(static: bool = True) -> dict:
    """Fixed-count masks; `static`: the batch as the loader makes it (positions, 4D or no mask), else the
    same masks in the default form (2D mask, no positions)."""
    info = TokenizerInfo(vocab_size=VOCAB, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, sha256="")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (4, SEQ), generator=gen)
    ids[:, 0], ids[:, -1], ids[0, 40:] = info.cls_id, info.sep_id, info.pad_id  # a padded last row
    masked, labels = mask_tokens(ids, MaskingConfig(fixed_count=True), info, gen)
    batch = {"input_ids": masked, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids),
             "labels": labels}
    if static:
        batch["mlm_positions"] = masked_positions(labels, positions_per_row(SEQ, 0.15))
        batch["attention_mask"] = static_padding_mask(ids, info.pad_id)
    return batch


def test_static_positions_give_the_loss_and_gradients_of_the_nonzero_path():
    objective, batch = _objective(), _batch()
    static = objective(**batch)
    g_static = torch.autograd.grad(static.loss, list(objective.parameters()))
    dynamic = objective(**_batch(static=False))
    g_dynamic = torch.autograd.grad(dynamic.loss, list(objective.parameters()))
    torch.testing.assert_close(static.loss, dynamic.loss, rtol=1e-6, atol=1e-6)
    assert static.masked == dynamic.masked == (batch["labels"] != -100).sum() and static.correct == dynamic.correct
    for a, b in zip(g_static, g_dynamic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "packed"])
def test_the_step_reads_nothing_back_to_the_host(padded):
    objective, batch = _objective(), _batch()
    if not padded:  # a batch of full rows comes without a mask (the loader leaves it out)
        batch = {**batch, "attention_mask": None}
    with SyncCounter() as counter:
        out = objective(**batch)
        out.loss.backward()
        torch.stack([out.loss.detach(), out.mlm_loss * out.masked, out.correct.float(), out.masked.float()])
    assert counter.seen == []
    with SyncCounter() as counter:  # the counter sees them: the nonzero path has one
        objective(**_batch(static=False)).loss.backward()
    assert "nonzero" in counter.seen


@pytest.mark.slow
def test_forward_and_loss_compile_to_one_graph_equal_to_eager():
    torch._dynamo.reset()
    batch = _batch()
    explained = torch._dynamo.explain(_objective())(**batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager, compiled = _objective(), _objective()
    compile_whole(compiled)
    out_e, out_c = eager(**batch), compiled(**batch)
    out_e.loss.backward()
    out_c.loss.backward()
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-6)
    assert out_c.correct == out_e.correct and out_c.masked == out_e.masked
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "packed"])
def test_attention_runs_sdpa_flash_kernel_not_the_math_fallback(padded):
    """Restricted to the flash backend, SDPA raises instead of falling back; the profile names the kernel.
    (CPU's flash kernel has no dropout, hence dropout 0 here; on a GPU, bench/gpu_pretrain.py checks it with
    dropout, at seq 512.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    objective, batch = _objective(), _batch()
    if not padded:
        batch = {**batch, "attention_mask": None}
    with torch.profiler.profile() as prof, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        objective(**batch).loss.backward()
    names = {e.key for e in prof.key_averages()}
    assert any("scaled_dot_product_flash_attention" in n for n in names), sorted(n for n in names if "attention" in n)
    assert not any("attention_math" in n for n in names)


def test_cuda_graphs_are_refused_without_the_static_step(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.stages.pretrain import compile_objective
    from tests.conftest import write_config

    path = write_config(tmp_path / "run.yaml", {"run": {"name": "r", "root": str(tmp_path)},
                                                "pretrain": {"compile": True, "compile_mode": "reduce-overhead"}})
    with pytest.raises(ConfigError, match="data.masking.fixed_count"):
        compile_objective(_objective(), load_config(path))
