"""The training data loader: memory-mapped shards, per-rank disjoint order, dynamic masking, resume.

Order: each epoch is one permutation of all rows drawn from (seed, epoch); rank r takes
rows r, r+W, r+2W, ... of it, every rank the same count, so ranks step in lockstep and
never share a row. Position: (epoch, next batch index). Resumed on another number of ranks
(or micro-batch size), the rest of the epoch's permutation is dealt out the same way. A batch is a pure function of
(seed, epoch, batch index, rank), masks included, so `state_dict()` taken after any batch and
loaded into a fresh loader continues with exactly the next batch, whatever was prefetched.
"""

from __future__ import annotations

import atexit
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.config import MaskingConfig
from pipeline.data.masking import mask_tokens, masked_positions, positions_per_row
from pipeline.data.shards import MANIFEST
from pipeline.data.tokenizer import TokenizerInfo, continuation_flags
from pipeline.errors import StageInputError


def read_manifest(prepare_dir: Path) -> dict:
    path = Path(prepare_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StageInputError(f"{path} does not exist; run the prepare stage first") from None


def manifest_tokenizer(manifest: dict) -> TokenizerInfo:
    fields = {k: v for k, v in manifest["tokenizer"].items() if k != "dtype"}
    return TokenizerInfo(**fields)


class ShardSet:
    """All rows of one sequence length and split, memory-mapped; nothing is read until asked."""

    def __init__(self, prepare_dir: Path, seq_len: int, split: str):
        self.dir = Path(prepare_dir)
        self.manifest = read_manifest(self.dir)
        self.info = manifest_tokenizer(self.manifest)
        self.seq_len = seq_len
        entries = self.manifest["shards"].get(f"L{seq_len}", {}).get(split)
        if entries is None:
            have = ", ".join(sorted(self.manifest["shards"]))
            raise StageInputError(f"{self.dir / MANIFEST}: no {split} shards of length {seq_len} (has {have})")
        dtype = np.dtype(self.manifest["tokenizer"]["dtype"])
        entries = [e for e in entries if e["rows"] > 0]
        self.rows_per_shard = np.array([e["rows"] for e in entries], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows_per_shard)])
        self._tokens = [self._map(e["path"], dtype, e["rows"], seq_len) for e in entries]
        self._pairs = [self._map(e["pairs_path"], np.uint16, e["rows"], 2) for e in entries] \
            if entries and "pairs_path" in entries[0] else None

    def _map(self, rel: str, dtype: np.dtype, rows: int, width: int) -> np.memmap:
        path = self.dir / rel
        expected = rows * width * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise StageInputError(f"{path}: missing or not {expected} bytes as the manifest says")
        return np.memmap(path, dtype=dtype, mode="r", shape=(rows, width))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def token_arrays(self) -> list[np.memmap]:
        """Each shard's rows, memory-mapped [rows, seq_len] (e.g. for corpus statistics)."""
        return list(self._tokens)

    @property
    def has_pairs(self) -> bool:
        return self._pairs is not None

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows (int64) and pair info for global row indices, gathered shard by shard."""
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        local = indices - self.offsets[shard]
        tokens = np.empty((len(indices), self.seq_len), dtype=np.int64)
        pairs = np.empty((len(indices), 2), dtype=np.int64) if self.has_pairs else None
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            rows = self._tokens[s][local[where]]
            top = int(rows.max()) if rows.size else 0
            if top >= self.info.vocab_size:  # cheap, and an embedding lookup would only say IndexError
                raise StageInputError(f"{self._tokens[s].filename}: token id {top} is not below the vocabulary "
                                      f"size {self.info.vocab_size}")
            tokens[where] = rows
            if pairs is not None:
                pairs[where] = self._pairs[s][local[where]]
        return tokens, pairs


def static_padding_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor | None:
    """The padding mask in the form that needs no device read: SDPA's 4D boolean [batch, 1, 1, seq] (given a
    2D mask, transformers asks the device whether it is all ones, to drop it), or None for a batch of
    packed rows, decided here on the host."""
    keep = ids != pad_id
    return None if bool(keep.all()) else keep[:, None, None, :]


class PretrainLoader:
    """Infinite iterator of masked micro-batches for one rank, with exact resume and prefetch."""

    def __init__(self, shards: ShardSet, micro_batch: int, masking: MaskingConfig, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, prefetch: int = 4, pin_memory: bool | None = None):
        self.shards, self.micro_batch, self.masking = shards, micro_batch, masking
        # page-locked batches (built on the prefetch thread) let the copy to a GPU run behind the step:
        # from pageable memory CUDA first waits for every kernel queued before it (a sync per batch)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed, self.rank, self.world_size, self.shuffle, self.prefetch = seed, rank, world_size, shuffle, prefetch
        self.rows_per_rank = len(shards) // world_size
        self.batches_per_epoch = self.rows_per_rank // micro_batch
        if self.batches_per_epoch == 0:
            raise StageInputError(f"{shards.dir}: {len(shards)} rows of length {shards.seq_len} cannot fill one "
                                  f"micro-batch of {micro_batch} on each of {world_size} rank(s)")
        self.continuation = torch.tensor(continuation_flags(shards.dir / "tokenizer")) \
            if masking.whole_word else None
        self.epoch, self.batch_index = 0, 0
        self.segment = (0, 0)  # (epoch, first row of its permutation): not 0 only after a layout change
        self._order: tuple[int, np.ndarray] | None = None
        self._worker: _Prefetcher | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "start": self._start(self.epoch),
                "seed": self.seed, "world_size": self.world_size, "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; saved by another number of ranks or micro-batch size, the rest
        of that epoch's permutation is dealt out anew (no row skipped or repeated, masks drawn afresh)."""
        if state["seed"] != self.seed:
            raise StageInputError(f"cannot resume the data order of {state} with seed={self.seed}")
        self.close()
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]
        self.segment = (self.epoch, state.get("start", 0))
        if (state["world_size"], state["micro_batch"]) != (self.world_size, self.micro_batch):
            self.segment = (self.epoch, self.segment[1] + state["batch_index"] * state["micro_batch"]
                            * state["world_size"])
            self.batch_index = 0
            if self.batches_in(self.epoch) == 0:  # the old layout's epoch tail is too short for the new one
                self.epoch, self.segment = self.epoch + 1, (0, 0)
        self._order = None

    def _start(self, epoch: int) -> int:
        return self.segment[1] if epoch == self.segment[0] else 0

    def batches_in(self, epoch: int) -> int:
        start = self._start(epoch)
        return (len(self.shards) - start) // self.world_size // self.micro_batch if start else self.batches_per_epoch

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's row indices for one epoch (cached: a permutation per epoch, not per batch). An epoch
        resumed on another layout begins at `start`, the rows the earlier layout consumed."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.shards)
            if self.shuffle:
                order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            else:
                order = np.arange(n, dtype=np.int64)
            start = self._start(epoch)
            mine = order[start:][self.rank::self.world_size]
            self._order = (epoch, mine[: (n - start) // self.world_size].astype(np.int64))
        return self._order[1]

    def make_batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        rows = self.rank_order(epoch)[index * self.micro_batch:(index + 1) * self.micro_batch]
        tokens, pairs = self.shards.take(rows)
        ids = torch.from_numpy(tokens)
        gen = torch.Generator().manual_seed(_batch_seed(self.seed, epoch, index, self.rank, self._start(epoch)))
        masked, labels = mask_tokens(ids, self.masking, self.shards.info, gen, self.continuation)
        batch = {"input_ids": masked, "attention_mask": (ids != self.shards.info.pad_id).long(),
                 "token_type_ids": torch.zeros_like(ids), "labels": labels,
                 "rows": torch.from_numpy(rows)}  # which rows these are: for audits, not for the model
        if self.masking.fixed_count:  # the static step: nothing in it depends on the batch's values
            batch["mlm_positions"] = masked_positions(labels, positions_per_row(ids.shape[1],
                                                                                self.masking.probability))
            padding = static_padding_mask(ids, self.shards.info.pad_id)
            if padding is None:
                del batch["attention_mask"]  # the engine moves every value to the device: no None in a batch
            else:
                batch["attention_mask"] = padding
        if pairs is not None:
            positions = torch.arange(ids.shape[1])
            b_start = torch.from_numpy(pairs[:, 0:1])
            batch["token_type_ids"] = ((positions >= b_start) & (ids != self.shards.info.pad_id)).long()
            batch["next_sentence_label"] = torch.from_numpy(pairs[:, 1])
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._worker is None:
            self._worker = _Prefetcher(self, self.epoch, self.batch_index, self.prefetch)
        batch = self._worker.get()
        self.batch_index += 1
        if self.batch_index == self.batches_in(self.epoch):
            self.epoch, self.batch_index = self.epoch + 1, 0
        return batch

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


def _batch_seed(seed: int, epoch: int, index: int, rank: int, start: int = 0) -> int:
    key = [seed, epoch, index, rank] + ([start] if start else [])  # start 0: the seeds of every earlier run
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Prefetcher:
    """Builds the next batches on a background thread (numpy and torch release the GIL)."""

    def __init__(self, loader: PretrainLoader, epoch: int, index: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(loader, epoch, index), daemon=True)
        self._thread.start()
        # a daemon thread still inside torch when the interpreter exits aborts the process
        atexit.register(self.stop)

    def _run(self, loader: PretrainLoader, epoch: int, index: int) -> None:
        try:
            while not self._stop.is_set():
                item = loader.make_batch(epoch, index)
                if loader.pin_memory:
                    item = {k: v if k == "rows" else v.pin_memory() for k, v in item.items()}
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                index += 1
                if index == loader.batches_in(epoch):
                    epoch, index = epoch + 1, 0
        except BaseException as exc:  # surface it in the consumer, not as a silent dead thread
            self._queue.put(exc)

    def get(self) -> dict[str, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        atexit.unregister(self.stop)
