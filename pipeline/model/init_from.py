"""Continue pretraining a published BERT (`pretrain.init_from`): its geometry, its weights, its vocab.

The directory is what transformers' `save_pretrained` writes for a `BertModel`, `BertForMaskedLM` or
`BertForPreTraining` (safetensors or a .bin). Loading goes through `from_pretrained` into the
pretraining model class, so transformers maps the prefixes and, for a checkpoint without an MLM head
(sentence-transformers models have none), initialises the head as BERT's, its decoder tied to the
word embeddings. Everything that can be wrong is checked before any training, in one line each: the
directory, the model type, a `model:` section that contradicts the checkpoint, a vocab that is not the
checkpoint's (never resized), positions shorter than a phase. Dropout stays the checkpoint's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, BertConfig, BertForMaskedLM, BertForPreTraining
from transformers.utils import logging as hf_logging

from pipeline.config import ModelConfig, RunConfig
from pipeline.errors import ConfigError, StageInputError
from pipeline.model.bert import PRESETS, bert_config, build_model

FIELD = "pretrain.init_from"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# model: fields -> the BertConfig attribute they set
GEOMETRY = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings"}
HEAD_PREFIXES = ("cls.",)  # what a headless checkpoint lacks, and may start fresh


def checkpoint_config(directory: Path) -> BertConfig:
    """The checkpoint's config, after checking the directory holds a BERT and its weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StageInputError(f"{FIELD}: {directory} is not a directory")
    if not (directory / "config.json").is_file():
        raise StageInputError(f"{FIELD}: {directory} has no config.json (a model saved with save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise StageInputError(f"{FIELD}: {directory / 'config.json'}: {str(exc).splitlines()[0]}") from None
    if config.model_type != "bert":
        raise StageInputError(f"{FIELD}: {directory} holds a '{config.model_type}' model, not a BERT")
    if not any((directory / name).is_file() for name in WEIGHTS):
        raise StageInputError(f"{FIELD}: {directory} has no {' or '.join(WEIGHTS)}")
    return config


def check_geometry(model: ModelConfig, config: BertConfig, directory: Path) -> None:
    """A `model:` field set in the config must say what the checkpoint says (the checkpoint decides)."""
    stated = {name: getattr(model, name) for name in GEOMETRY if name in model.model_fields_set}
    if "preset" in model.model_fields_set:
        for name, value in zip(("hidden_size", "num_layers", "num_heads", "intermediate_size"), PRESETS[model.preset]):
            stated.setdefault(name, value)
    for name, value in stated.items():
        theirs = getattr(config, GEOMETRY[name])
        if value is not None and value != theirs:
            source = "model.preset" if name not in model.model_fields_set else f"model.{name}"
            raise ConfigError(f"{source}: {name} {value} contradicts {FIELD}'s {theirs} ({directory / 'config.json'}); "
                              "leave it out, the checkpoint sets it")


def check_vocab(config: BertConfig, directory: Path, tokenizer_dir: Path, vocab_size: int) -> None:
    """The prepared vocab must be the checkpoint's: same size as its embedding rows, same tokens when it ships a
    vocab.txt. Resizing the embeddings would silently give tokens other meanings."""
    hint = "prepare with data.tokenizer.kind: pretrained (the checkpoint's own vocab)"
    if vocab_size != config.vocab_size:
        raise StageInputError(f"{FIELD}: the prepared vocab has {vocab_size} tokens ({tokenizer_dir / 'vocab.txt'}), "
                              f"the checkpoint's embeddings {config.vocab_size} rows ({directory}); {hint}")
    theirs = directory / "vocab.txt"
    if theirs.is_file() and theirs.read_bytes().split() != (tokenizer_dir / "vocab.txt").read_bytes().split():
        raise StageInputError(f"{FIELD}: the prepared vocab ({tokenizer_dir / 'vocab.txt'}) is not the checkpoint's "
                              f"({theirs}); {hint}")


def check_positions(config: BertConfig, directory: Path, seq_lens: list[int]) -> None:
    longest = max(seq_lens, default=0)
    if longest > config.max_position_embeddings:
        raise ConfigError(f"pretrain.phases: seq_len {longest} exceeds {FIELD}'s max_position_embeddings "
                          f"{config.max_position_embeddings} ({directory / 'config.json'})")


def load_pretrained(directory: Path, config: BertConfig, pairs: bool,
                    log: logging.Logger) -> BertForMaskedLM | BertForPreTraining:
    """The checkpoint's weights in the pretraining model (fp32); a missing head starts as BERT's, said in the log."""
    cls = BertForPreTraining if pairs else BertForMaskedLM
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report (a table of the head's keys) says what the line below says
    try:
        model, info = cls.from_pretrained(str(directory), config=config, dtype=torch.float32,
                                          attn_implementation="sdpa", output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise StageInputError(f"{FIELD}: {directory}: weights unreadable ({str(exc).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    encoder = [k for k in missing if not k.startswith(HEAD_PREFIXES) and not k.startswith("bert.pooler.")]
    if encoder:
        raise StageInputError(f"{FIELD}: {directory} lacks {len(encoder)} encoder weight(s) of its own config, "
                              f"e.g. {encoder[0]}")
    if missing:
        log.info(f"{FIELD}: {directory} has no {'pretraining' if pairs else 'MLM'} head ({len(missing)} tensors, "
                 "e.g. " + missing[0] + "): initialised as BERT's, the decoder tied to the word embeddings")
    return model


def starting_model(cfg: RunConfig, vocab_size: int, pad_id: int, pairs: bool, tokenizer_dir: Path,
                   log: logging.Logger) -> tuple[BertConfig, BertForMaskedLM | BertForPreTraining]:
    """The weights pretraining (and the search, from the same point) starts from: random from the run's
    seed, or `pretrain.init_from`'s after every check; (its config, the model)."""
    torch.manual_seed(cfg.run.seed)  # the same weights (or fresh head) on every rank and every rerun
    directory = cfg.pretrain.init_from
    if directory is None:
        config = bert_config(cfg.model, vocab_size, pad_id)
        return config, build_model(config, pairs=pairs)
    config = checkpoint_config(directory)
    check_geometry(cfg.model, config, directory)
    check_vocab(config, directory, tokenizer_dir, vocab_size)
    check_positions(config, directory, [p.seq_len for p in cfg.pretrain.phases])
    return config, load_pretrained(directory, config, pairs, log)


def checkpoint_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """The checkpoint's files (path, size, mtime): a changed checkpoint reruns the stages built on it."""
    directory = cfg.pretrain.init_from
    if directory is None:
        return {}
    files = sorted(p for p in Path(directory).glob("*") if p.is_file()) if Path(directory).is_dir() else []
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"init_from": hashlib.sha256(repr((str(directory), stats)).encode()).hexdigest()}
