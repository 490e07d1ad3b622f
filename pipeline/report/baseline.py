"""The reference a masked-LM loss is judged against: predict every masked token from corpus frequency.

A model that ignores context can do no better than the training split's unigram distribution, so
its cross-entropy on the validation tokens (and the accuracy of always guessing the most frequent
token) is the line a pretrained model must clearly cross before its fine-tuning results mean
anything. Counted over the tokens masking can choose (all but [PAD], [CLS], [SEP]); add-one
smoothing keeps a token unseen in training finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.data.loader import ShardSet, read_manifest
from pipeline.errors import StageInputError


def _counts(shards: ShardSet, vocab_size: int, special: list[int]) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens in shards.token_arrays():  # memory-mapped, one shard at a time
        counts += np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab_size)[:vocab_size]
    counts[special] = 0
    return counts


def unigram_baseline(prepare_dir: Path) -> dict | None:
    """{'seq_len', 'cross_entropy' (nats per token), 'accuracy', 'tokens'} on the validation split, or None."""
    try:
        manifest = read_manifest(prepare_dir)
        seq_len = min(int(key[1:]) for key in manifest["shards"])
        train, valid = ShardSet(prepare_dir, seq_len, "train"), ShardSet(prepare_dir, seq_len, "valid")
    except (StageInputError, ValueError, KeyError):
        return None
    info = train.info
    special = [info.pad_id, info.cls_id, info.sep_id]
    seen = _counts(train, info.vocab_size, special)
    held = _counts(valid, info.vocab_size, special)
    if held.sum() == 0:
        return None
    prob = (seen + 1) / (seen.sum() + info.vocab_size - len(special))
    prob[special] = 1.0  # never counted on the validation side either
    cross_entropy = -float((held * np.log(prob)).sum() / held.sum())
    accuracy = float(held[int(seen.argmax())] / held.sum())
    return {"seq_len": seq_len, "cross_entropy": cross_entropy, "perplexity": math.exp(cross_entropy),
            "accuracy": accuracy, "tokens": int(held.sum())}
