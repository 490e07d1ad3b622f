"""From documents' token ids to fixed-length training rows.

MLM rows are packed: documents follow each other in one stream, separated by [SEP], cut
into rows of [CLS] + (L-2) tokens + [SEP], so almost no position is padding (only the
unit's last row is padded). NSP/SOP rows are sentence pairs [CLS] A [SEP] B [SEP] built
from one document at a time, as in BERT's and ALBERT's recipes. Masking is not done here:
it is drawn anew at load time (dynamic masking).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from pipeline.data.tokenizer import TokenizerInfo

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\n+")


def is_validation(doc: str, fraction: float) -> bool:
    """Stable split by content: the same document lands in the same split on every run."""
    if fraction <= 0.0:
        return False
    value = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
    return value < fraction * 2.0**64


def split_sentences(doc: str) -> list[str]:
    return [s for s in (part.strip() for part in SENTENCE_END.split(doc)) if s]


class StreamPacker:
    """Packs documents into full rows: [CLS] chunk [SEP], the chunk cut from a [SEP]-joined stream."""

    def __init__(self, seq_len: int, info: TokenizerInfo, dtype: np.dtype):
        self.seq_len, self.info, self.dtype = seq_len, info, dtype
        self.capacity = seq_len - 2
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def add(self, ids: list[int]) -> np.ndarray | None:
        """Queue a document; return the rows it completed (or None)."""
        piece = np.fromiter(ids, dtype=np.int64, count=len(ids))
        self._pending.append(np.append(piece, self.info.sep_id))
        self._pending_len += len(piece) + 1
        if self._pending_len < self.capacity * 64:  # batch the concatenation, not per document
            return None
        return self._drain(final=False)

    def flush(self) -> np.ndarray | None:
        return self._drain(final=True)

    def _drain(self, final: bool) -> np.ndarray | None:
        if not self._pending:
            return None
        stream = np.concatenate(self._pending)
        n_full = len(stream) // self.capacity
        rest = stream[n_full * self.capacity:]
        body = stream[: n_full * self.capacity].reshape(n_full, self.capacity)
        if final and len(rest):
            padded = np.full(self.capacity, self.info.pad_id, dtype=np.int64)
            padded[: len(rest)] = rest
            body = np.vstack([body, padded[None]])
            rest = rest[:0]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)
        if not len(body):
            return None
        rows = np.empty((len(body), self.seq_len), dtype=np.int64)
        rows[:, 0] = self.info.cls_id
        rows[:, 1:-1] = body
        rows[:, -1] = np.where(body[:, -1] == self.info.pad_id, self.info.pad_id, self.info.sep_id)
        if final:  # the padded row's closing [SEP] goes right after its last token
            self._close_padded_row(rows[-1])
        return rows.astype(self.dtype)

    def _close_padded_row(self, row: np.ndarray) -> None:
        used = int(np.count_nonzero(row != self.info.pad_id))
        if used < self.seq_len and row[used - 1] != self.info.sep_id:
            row[used] = self.info.sep_id


class PairPacker:
    """Sentence pairs for NSP (B from a random document half the time) or SOP (A/B swapped half the time).

    Rows come with (b_start, label): the position where segment B begins and the pair label.
    """

    def __init__(self, seq_len: int, info: TokenizerInfo, dtype: np.dtype, objective: str, seed: int):
        self.seq_len, self.info, self.dtype, self.objective = seq_len, info, dtype, objective
        self.rng = np.random.default_rng(seed)
        self._previous: list[list[int]] = []  # the last document's sentences: NSP's random source

    def add_document(self, sentences: list[list[int]]) -> tuple[np.ndarray, np.ndarray] | None:
        target = self.seq_len - 3
        rows, aux = [], []
        chunk: list[list[int]] = []
        for i, sentence in enumerate(sentences):
            chunk.append(sentence[:target])
            if sum(map(len, chunk)) >= target or i == len(sentences) - 1:
                pair = self._pair(chunk, target)
                if pair is not None:
                    rows.append(pair[0])
                    aux.append(pair[1])
                chunk = []
        if sentences:
            self._previous = sentences
        if not rows:
            return None
        return np.stack(rows).astype(self.dtype), np.array(aux, dtype=np.uint16)

    def _pair(self, chunk: list[list[int]], target: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        if len(chunk) < 2 and not (self.objective == "nsp" and self._previous and chunk):
            return None
        cut = int(self.rng.integers(1, len(chunk))) if len(chunk) > 1 else 1
        a = [t for s in chunk[:cut] for t in s]
        b = [t for s in chunk[cut:] for t in s]
        label = 0
        if self.objective == "nsp" and (not b or self.rng.random() < 0.5):
            b, label = [t for s in self._previous for t in s], 1  # 1 = B is not the next text
        elif self.objective == "sop" and self.rng.random() < 0.5:
            a, b, label = b, a, 1  # 1 = the two segments are in swapped order
        while len(a) + len(b) > target:  # trim the longer side, as BERT does
            (a if len(a) > len(b) else b).pop()
        if not a or not b:
            return None
        row = np.full(self.seq_len, self.info.pad_id, dtype=np.int64)
        ids = [self.info.cls_id, *a, self.info.sep_id, *b, self.info.sep_id]
        row[: len(ids)] = ids
        return row, (len(a) + 2, label)
