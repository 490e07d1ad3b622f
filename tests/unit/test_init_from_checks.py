"""pretrain.init_from: a saved transformers BERT as the starting point, every bad input one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, StageInputError
from pipeline.model.init_from import check_geometry, check_positions, check_vocab, checkpoint_config, load_pretrained

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]


def _saved(directory: Path, cls=BertModel, positions: int = 64) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=positions)
    cls(config).save_pretrained(str(directory))
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return directory


def test_a_headless_checkpoint_loads_its_encoder_and_gets_a_tied_head(tmp_path, caplog):
    directory = _saved(tmp_path / "minilm")
    with caplog.at_level(logging.INFO):
        model = load_pretrained(directory, checkpoint_config(directory), pairs=False, log=logging.getLogger("t"))
    source = BertModel.from_pretrained(str(directory))
    for name, value in source.state_dict().items():
        if name.startswith("pooler."):  # BertForMaskedLM has none
            continue
        assert torch.equal(model.bert.state_dict()[name], value), name
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert "has no MLM head" in caplog.text and "tied" in caplog.text


def test_a_masked_lm_checkpoint_keeps_its_head(tmp_path, caplog):
    directory = _saved(tmp_path / "mlm", cls=BertForMaskedLM)
    with caplog.at_level(logging.INFO):
        model = load_pretrained(directory, checkpoint_config(directory), pairs=False, log=logging.getLogger("t"))
    saved = BertForMaskedLM.from_pretrained(str(directory))
    assert torch.equal(model.cls.predictions.transform.dense.weight, saved.cls.predictions.transform.dense.weight)
    assert "no MLM head" not in caplog.text


def test_a_model_section_that_contradicts_the_checkpoint_names_both_values(tmp_path):
    directory = _saved(tmp_path / "m")
    config = checkpoint_config(directory)
    check_geometry(ModelConfig(dropout=0.0), config, directory)  # geometry left to the checkpoint
    check_geometry(ModelConfig(hidden_size=32, num_layers=2), config, directory)
    with pytest.raises(ConfigError, match=r"model.num_layers: num_layers 6 contradicts pretrain.init_from's 2"):
        check_geometry(ModelConfig(num_layers=6), config, directory)
    with pytest.raises(ConfigError, match=r"model.preset: hidden_size 768 contradicts"):
        check_geometry(ModelConfig(preset="base"), config, directory)


def test_another_vocab_is_refused_never_resized(tmp_path):
    directory = _saved(tmp_path / "m")
    config = checkpoint_config(directory)
    prepared = tmp_path / "tok"
    prepared.mkdir()
    (prepared / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    check_vocab(config, directory, prepared, len(VOCAB))
    with pytest.raises(StageInputError, match=r"prepared vocab has 30522 tokens .* embeddings 64 rows"):
        check_vocab(config, directory, prepared, 30522)
    (prepared / "vocab.txt").write_text("\n".join(VOCAB[:-1] + ["other"]) + "\n")
    with pytest.raises(StageInputError, match="is not the checkpoint's"):
        check_vocab(config, directory, prepared, len(VOCAB))


def test_positions_shorter_than_a_phase_are_refused(tmp_path):
    directory = _saved(tmp_path / "m", positions=64)
    check_positions(checkpoint_config(directory), directory, [32, 64])
    with pytest.raises(ConfigError, match="seq_len 128 exceeds pretrain.init_from's max_position_embeddings 64"):
        check_positions(checkpoint_config(directory), directory, [64, 128])


def test_bad_directories_are_one_line_each(tmp_path):
    with pytest.raises(StageInputError, match="is not a directory"):
        checkpoint_config(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageInputError, match="has no config.json"):
        checkpoint_config(tmp_path / "empty")
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(StageInputError, match="holds a 'gpt2' model, not a BERT"):
        checkpoint_config(gpt)
    broken = _saved(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StageInputError, match="weights unreadable") as caught:
        load_pretrained(broken, checkpoint_config(broken), pairs=False, log=logging.getLogger("t"))
    assert "\n" not in str(caught.value)
    (broken / "model.safetensors").unlink()
    with pytest.raises(StageInputError, match="has no model.safetensors or pytorch_model.bin"):
        checkpoint_config(broken)


def test_the_plan_costs_the_checkpoints_geometry_not_the_model_section(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.plan.costmodel import _model

    directory = _saved(tmp_path / "m")
    cfg = RunConfig(run={"name": "p"}, data={"tokenizer": {"kind": "pretrained"}},
                    pretrain={"init_from": str(directory)})
    model = _model(cfg)
    assert (model.hidden_size, model.num_hidden_layers, model.vocab_size) == (32, 2, len(VOCAB))
    with pytest.raises(ValueError, match="kind: pretrained takes the vocab of pretrain.init_from"):
        RunConfig(run={"name": "p"}, data={"tokenizer": {"kind": "pretrained"}})
