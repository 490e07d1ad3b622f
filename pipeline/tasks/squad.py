"""SQuAD v1.1 / v2.0 extractive question answering for BERT.

Three steps, each usable on its own:

* `read_squad` reads the official JSON format into `SquadExample`s and checks every answer against its context;
* `make_features` turns examples into fixed-length windows over the context (the fast tokenizer does the windowing
  and keeps character offsets), with start/end token labels for training;
* `postprocess` turns the model's start/end logits back into answer strings, one per question id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Examples tokenized per call: bounds the tokenizer's Python-side lists (input ids, offsets, masks) on SQuAD train
# while keeping the Rust tokenizer's batch parallelism.
_CHUNK = 1000

# Special tokens in a question/context pair: [CLS] question [SEP] context [SEP].
_PAIR_SPECIALS = 3


@dataclass(frozen=True)
class SquadExample:
    """One question on one context, with its gold answers (none for a v2 unanswerable question)."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]  # character offsets into `context`, parallel to `answers`; -1: not found
    relocated: int = 0  # answers found near, not at, their `answer_start` in the file

    @property
    def unlocated(self) -> bool:
        """Answerable, but no answer text was found in the context: nothing to label a window with."""
        return bool(self.answers) and all(start < 0 for start in self.answer_starts)

    @property
    def is_impossible(self) -> bool:
        return not self.answers


# --------------------------------------------------------------------------------------------- reading


def read_squad(path: Path) -> list[SquadExample]:
    """All questions of a SQuAD-format JSON file (v1.1 or v2.0), in file order.

    v2 `plausible_answers` are ignored, and a question marked `"is_impossible": true` gets no answers whatever its
    `answers` field holds. Any problem raises `PipelineError` with one line naming the file and the place in it.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise PipelineError(f"{path}: expected a JSON object with a \"data\" list (the SQuAD format)")
    examples: list[SquadExample] = []
    seen: set[str] = set()
    for i, article in enumerate(data["data"]):
        place = f"data[{i}]"
        for j, paragraph in enumerate(_field(article, "paragraphs", list, path, place)):
            para_place = f"{place}.paragraphs[{j}]"
            context = _field(paragraph, "context", str, path, para_place)
            for k, qa in enumerate(_field(paragraph, "qas", list, path, para_place)):
                example = _read_question(qa, context, path, f"{para_place}.qas[{k}]")
                if example.id in seen:
                    raise PipelineError(f"{path}: {para_place}.qas[{k}]: duplicate id {example.id!r}")
                seen.add(example.id)
                examples.append(example)
    if not examples:
        raise PipelineError(f"{path}: no questions")
    return examples


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise PipelineError(f"{path}: no questions (the file is empty)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON at line {e.lineno}:{e.colno}: {e.msg}") from None


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", bool: "true or false"}


def _field(obj: Any, key: str, kind: type, path: Path, place: str) -> Any:
    """`obj[key]`, which must exist and be of `kind`; otherwise a one-line error at `place`."""
    if not isinstance(obj, dict):
        raise PipelineError(f"{path}: {place}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise PipelineError(f"{path}: {place}: missing '{key}'")
    value = obj[key]
    # bool is an int subclass in Python, but `true` is never a valid offset or count
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PipelineError(f"{path}: {place}: '{key}' must be {_KIND_NAMES[kind]}, got {type(value).__name__}")
    return value



def _read_question(qa: Any, context: str, path: Path, place: str) -> SquadExample:
    """One `qas` entry. An answer not at its `answer_start` (published files have off-by-a-few offsets) is
    taken at the occurrence of its text nearest to that offset, as the reference tools search for it; one
    whose text is nowhere in the context keeps its text (scored against) with start -1 (no training label)."""
    qid = _field(qa, "id", str, path, place)
    question = _field(qa, "question", str, path, place)
    impossible = _field(qa, "is_impossible", bool, path, place) if "is_impossible" in qa else False
    if impossible:
        return SquadExample(qid, question, context, (), ())
    texts: list[str] = []
    starts: list[int] = []
    for a, answer in enumerate(_field(qa, "answers", list, path, place)):
        ans_place = f"{place}.answers[{a}]"
        text = _field(answer, "text", str, path, ans_place)
        start = _field(answer, "answer_start", int, path, ans_place)
        if not text:
            raise PipelineError(f"{path}: {ans_place}: empty answer text (id {qid!r})")
        texts.append(text)
        starts.append(locate(context, text, start))
    relocated = sum(0 <= found != given["answer_start"] for found, given in zip(starts, qa["answers"]))
    return SquadExample(qid, question, context, tuple(texts), tuple(starts), relocated)


def locate(context: str, text: str, start: int) -> int:
    """`start` if `text` is there, else the occurrence of `text` nearest to it, else -1."""
    if 0 <= start and context[start:start + len(text)] == text:
        return start
    found, at = [], context.find(text)
    while at >= 0:
        found.append(at)
        at = context.find(text, at + 1)
    return min(found, key=lambda at: abs(at - start)) if found else -1


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------- features


@dataclass
class SquadFeatures:
    """Model inputs for all windows of all examples; several windows may belong to one example."""

    input_ids: torch.Tensor  # [n, max_len] long
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    start_positions: torch.Tensor  # [n] long; 0 ([CLS]) when the window lacks the first gold answer
    end_positions: torch.Tensor  # [n] long; inclusive
    example_index: list[int]  # feature -> index into the examples list
    offsets: list[list[tuple[int, int] | None]]  # context char span per token; None outside the context

    def __len__(self) -> int:
        return len(self.example_index)


def make_features(examples: Sequence[SquadExample], tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                  doc_stride: int, max_query_len: int = 64) -> SquadFeatures:
    """Fixed-length `[CLS] question [SEP] context-window [SEP]` features, padded to `max_seq_len`.

    A context too long for one window is split into several; `doc_stride` is the number of context tokens that
    consecutive windows of one example share (the `stride` of Hugging Face fast tokenizers, *not* the step between
    window starts), so an answer cut by one window's end appears whole in the next unless it is longer than the
    overlap. Questions are first cut to `max_query_len` tokens. Labels come from the first gold answer.
    """
    room = max_seq_len - max_query_len - _PAIR_SPECIALS
    # the question can take max_query_len tokens, so each window surely has `room` context tokens; a stride at
    # least that large would never move the window forward (the tokenizer refuses it)
    if doc_stride >= room:
        raise PipelineError(f"doc_stride: {doc_stride} must be smaller than "
                            f"max_seq_len - max_query_len - 3 = {room}")
    if doc_stride < 0:
        raise PipelineError(f"doc_stride: {doc_stride} must not be negative")
    if not getattr(tokenizer, "is_fast", False):
        raise PipelineError("SQuAD features need a fast (Rust) tokenizer: tokenizer.json is missing")
    if tokenizer.padding_side != "right":
        # [CLS] at index 0 is the "no answer" label and the null score below; left padding would move it
        raise PipelineError(f"SQuAD features need right padding, the tokenizer pads {tokenizer.padding_side}")
    parts = [_encode_chunk(examples, lo, tokenizer, max_seq_len, doc_stride, max_query_len)
             for lo in range(0, len(examples), _CHUNK)]
    if not parts:
        empty = torch.zeros(0, max_seq_len, dtype=torch.long)
        return SquadFeatures(empty, empty.clone(), empty.clone(), torch.zeros(0, dtype=torch.long),
                             torch.zeros(0, dtype=torch.long), [], [])
    return SquadFeatures(
        input_ids=torch.cat([p.input_ids for p in parts]),
        attention_mask=torch.cat([p.attention_mask for p in parts]),
        token_type_ids=torch.cat([p.token_type_ids for p in parts]),
        start_positions=torch.cat([p.start_positions for p in parts]),
        end_positions=torch.cat([p.end_positions for p in parts]),
        example_index=[i for p in parts for i in p.example_index],
        offsets=[o for p in parts for o in p.offsets],
    )


def _encode_chunk(examples: Sequence[SquadExample], lo: int, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                  doc_stride: int, max_query_len: int) -> SquadFeatures:
    """Features for `examples[lo:lo + _CHUNK]`; example indices are global."""
    chunk = examples[lo:lo + _CHUNK]
    questions = _truncate_questions([ex.question for ex in chunk], tokenizer, max_query_len)
    enc = tokenizer(questions, [ex.context for ex in chunk], truncation="only_second", max_length=max_seq_len,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length")
    starts: list[int] = []
    ends: list[int] = []
    offsets: list[list[tuple[int, int] | None]] = []
    for f, local in enumerate(enc["overflow_to_sample_mapping"]):
        # only context tokens (sequence 1) keep a span: question, special and pad tokens can never be an answer
        spans = [tuple(off) if seq == 1 else None for off, seq in zip(enc["offset_mapping"][f], enc.sequence_ids(f))]
        offsets.append(spans)
        start, end = _label(chunk[local], spans)
        starts.append(start)
        ends.append(end)
    input_ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    token_types = enc.get("token_type_ids")
    return SquadFeatures(
        input_ids=input_ids,
        attention_mask=torch.tensor(enc["attention_mask"], dtype=torch.long),
        token_type_ids=torch.zeros_like(input_ids) if token_types is None else torch.tensor(token_types),
        start_positions=torch.tensor(starts, dtype=torch.long),
        end_positions=torch.tensor(ends, dtype=torch.long),
        example_index=[lo + i for i in enc["overflow_to_sample_mapping"]],
        offsets=offsets,
    )


def _truncate_questions(questions: list[str], tokenizer: PreTrainedTokenizerBase, max_query_len: int) -> list[str]:
    """Each question cut to at most `max_query_len` tokens, by string offset so nothing is decoded and re-encoded."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for question, spans in zip(questions, enc["offset_mapping"]):
        # cutting where token `max_query_len` starts keeps exactly the tokens before it: WordPiece's greedy
        # longest-match gives a word's prefix the same pieces it had in the whole word
        out.append(question[:spans[max_query_len][0]] if len(spans) > max_query_len else question)
    return out


def _label(example: SquadExample, spans: list[tuple[int, int] | None]) -> tuple[int, int]:
    """Inclusive token (start, end) of the first gold answer in this window, or (0, 0) when it is not all inside."""
    located = [(s, a) for s, a in zip(example.answer_starts, example.answers) if s >= 0]
    if not located:  # unanswerable, or no answer text found in the context
        return 0, 0
    char_start, answer = located[0]
    char_end = char_start + len(answer)
    context = [t for t, span in enumerate(spans) if span is not None]
    if not context or spans[context[0]][0] > char_start or spans[context[-1]][1] < char_end:
        return 0, 0
    # first token ending after the answer start and last token starting before its end: an answer that starts or
    # ends in whitespace does not pull in the neighbouring word
    start = next(t for t in context if spans[t][1] > char_start)
    end = next(t for t in reversed(context) if spans[t][0] < char_end)
    return (start, end) if start <= end else (0, 0)


# --------------------------------------------------------------------------------------------- predictions


def postprocess(examples: Sequence[SquadExample], features: SquadFeatures, start_logits: torch.Tensor,
                end_logits: torch.Tensor, n_best: int = 20, max_answer_len: int = 30, version_2: bool = False,
                null_threshold: float = 0.0) -> dict[str, str]:
    """Answer text per example id: the best-scoring span over all of the example's windows.

    Candidates are the top `n_best` start and end tokens of each window, kept when both lie in the context, start
    <= end and the span has at most `max_answer_len` tokens; a span's score is start + end logit. With `version_2`
    the answer is "" when the null score ([CLS] start + end, the minimum over the example's windows) beats the best
    span by more than `null_threshold`. An example without any valid span also gets "".
    """
    if start_logits.shape != features.input_ids.shape or end_logits.shape != features.input_ids.shape:
        raise ValueError(f"logits {tuple(start_logits.shape)}/{tuple(end_logits.shape)} do not match the features "
                         f"{tuple(features.input_ids.shape)}")
    start_logits = start_logits.detach().float().cpu()
    end_logits = end_logits.detach().float().cpu()
    best_score, best_start, best_end = _best_spans(features, start_logits, end_logits, n_best, max_answer_len)
    null = (start_logits[:, 0] + end_logits[:, 0]).tolist()
    best: list[tuple[float, int, int, int] | None] = [None] * len(examples)  # (score, feature, start, end)
    null_min = [float("inf")] * len(examples)
    for f, ex in enumerate(features.example_index):
        null_min[ex] = min(null_min[ex], null[f])
        score = best_score[f]
        if score != float("-inf") and (best[ex] is None or score > best[ex][0]):
            best[ex] = (score, f, best_start[f], best_end[f])
    predictions: dict[str, str] = {}
    for ex, example in enumerate(examples):
        choice = best[ex]
        if choice is None or (version_2 and null_min[ex] - choice[0] > null_threshold):
            predictions[example.id] = ""
            continue
        _, f, start, end = choice
        spans = features.offsets[f]
        predictions[example.id] = example.context[spans[start][0]:spans[end][1]]
    return predictions


def _best_spans(features: SquadFeatures, start_logits: torch.Tensor, end_logits: torch.Tensor, n_best: int,
                max_answer_len: int) -> tuple[list[float], list[int], list[int]]:
    """Per window, the best valid (score, start, end) among top-`n_best` starts x ends; score -inf when none."""
    n, seq_len = start_logits.shape
    if n == 0:
        return [], [], []
    in_context = torch.tensor([[span is not None for span in spans] for spans in features.offsets], dtype=torch.bool)
    k = min(n_best, seq_len)
    s_val, s_idx = start_logits.topk(k, dim=1)
    e_val, e_idx = end_logits.topk(k, dim=1)
    # all k x k pairs of each window at once: [n, k, k]
    score = s_val[:, :, None] + e_val[:, None, :]
    length = e_idx[:, None, :] - s_idx[:, :, None] + 1
    valid = (length >= 1) & (length <= max_answer_len)
    valid &= in_context.gather(1, s_idx)[:, :, None] & in_context.gather(1, e_idx)[:, None, :]
    score = score.masked_fill(~valid, float("-inf")).view(n, k * k)
    top, flat = score.max(dim=1)
    starts = s_idx.gather(1, (flat // k)[:, None]).squeeze(1)
    ends = e_idx.gather(1, (flat % k)[:, None]).squeeze(1)
    return top.tolist(), starts.tolist(), ends.tolist()
