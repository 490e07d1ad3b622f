"""Downstream metrics against hand-computed GLUE and SQuAD scores."""

from __future__ import annotations

import math
import warnings

import pytest

from pipeline.tasks.metrics import (
    classification_metrics,
    normalize_answer,
    primary_metric,
    regression_metrics,
    squad_exact,
    squad_f1,
    squad_metrics,
    task_metrics,
)


def test_accuracy_three_of_four():
    result = classification_metrics([1, 0, 1, 1], [1, 0, 0, 1], num_labels=2)
    assert result["accuracy"] == pytest.approx(0.75)
    assert all(type(value) is float for value in result.values())
    assert set(result) == {"accuracy", "f1", "mcc"}


def test_binary_f1_and_mcc_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 1, 0]
    preds = [1, 1, 0, 1, 0, 0, 0, 0]
    # TP=2, FN=2, FP=1, TN=3; precision 2/3, recall 2/4 -> F1 = 2pr/(p+r) = (2/3)/(7/6) = 4/7
    # (macro F1 would differ: class 0 has p=3/5, r=3/4, F1=2/3)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(3*4*4*5)
    result = classification_metrics(preds, labels, num_labels=2)
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["f1"] == pytest.approx(4 / 7)
    assert result["mcc"] == pytest.approx(4 / math.sqrt(240))


def test_macro_f1_three_classes_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # class 0: TP1 FP1 FN1 -> 1/2; class 1: TP2 FP1 FN0 -> p=2/3 r=1 -> 4/5; class 2: TP1 FP0 FN1 -> p=1 r=1/2 -> 2/3
    result = classification_metrics(preds, labels, num_labels=3)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_constant_predictor_has_zero_mcc_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = classification_metrics([1, 1, 1, 1], [1, 0, 1, 0], num_labels=2)
        # no positive ever present: F1 of class 1 is defined as 0 rather than a warning
        empty = classification_metrics([0, 0, 0], [0, 0, 0], num_labels=2)
    assert result["mcc"] == 0.0
    assert result["accuracy"] == pytest.approx(0.5)
    # p = 2/4, r = 1 -> F1 = 2/3
    assert result["f1"] == pytest.approx(2 / 3)
    assert empty["accuracy"] == 1.0 and empty["f1"] == 0.0


def test_monotone_nonlinear_regression_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]
    y = [1.0, 4.0, 9.0, 16.0]
    # deviations from the means 2.5 and 7.5: dx = (-1.5, -.5, .5, 1.5), dy = (-6.5, -3.5, 1.5, 8.5)
    # sum dx*dy = 25, sum dx^2 = 5, sum dy^2 = 129 -> pearson = 25 / sqrt(645)
    pearson = 25 / math.sqrt(645)
    result = regression_metrics(x, y)
    assert result["spearman"] == pytest.approx(1.0)
    assert result["pearson"] == pytest.approx(pearson)
    assert result["pearson"] < 1.0
    assert result["corr"] == pytest.approx((pearson + 1.0) / 2)
    assert regression_metrics(x, y[::-1])["spearman"] == pytest.approx(-1.0)


def test_constant_regression_input_gives_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert result == {"pearson": 0.0, "spearman": 0.0, "corr": 0.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat!", "cat"),
        ("an apple", "apple"),
        ("theatre", "theatre"),
        ("Anna saw a bat", "anna saw bat"),
        ("1,000", "1000"),
        ("U.S.A.", "usa"),
        ("don't", "dont"),
        ("Caf\u00e9\u00a0 au\tlait\n", "caf\u00e9 au lait"),
        ("\u201cquoted\u201d", "\u201cquoted\u201d"),  # only ASCII punctuation is dropped, as in the official script
        ("  A  ", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_squad_f1_partial_overlap_by_hand():
    # "big red dog" vs "red dog barked": common 2, p = 2/3, r = 2/3 -> F1 = 2/3
    assert squad_f1("the big red dog", ["red dog barked"]) == pytest.approx(2 / 3)
    assert squad_exact("the big red dog", ["red dog barked"]) == 0.0
    assert squad_f1("nothing shared", ["red dog"]) == 0.0


def test_squad_multiple_golds_take_the_max():
    assert squad_f1("the big red dog", ["cat", "red dog barked"]) == pytest.approx(2 / 3)
    assert squad_f1("the big red dog", ["cat", "red dog barked", "Big red dog."]) == 1.0
    assert squad_exact("Big Red Dog", ["cat", "the big red dog"]) == 1.0


def test_squad_f1_counts_duplicate_tokens_with_multiplicity():
    # common = min(3, 1) = 1: p = 1/3, r = 1/2 -> F1 = (1/3) / (5/6) = 2/5
    assert squad_f1("dog dog dog", ["dog cat"]) == pytest.approx(2 / 5)
    # common = 2: p = 1, r = 2/3 -> F1 = (4/3) / (5/3) = 4/5
    assert squad_f1("dog dog", ["dog dog cat"]) == pytest.approx(4 / 5)


def test_squad_unanswerable():
    assert squad_exact("", []) == 1.0 and squad_f1("", []) == 1.0
    assert squad_exact("x", []) == 0.0 and squad_f1("x", []) == 0.0
    # a prediction or gold that normalises to nothing is the empty answer
    assert squad_exact("The.", []) == 1.0 and squad_f1("the", ["", "a"]) == 1.0
    assert squad_exact("", ["Paris"]) == 0.0 and squad_f1("", ["Paris"]) == 0.0


def test_squad_metrics_percent_average_with_missing_prediction():
    references = {"q1": ["red dog barked"], "q2": ["Paris", "paris france"], "q3": ["42"]}
    predictions = {"q1": "the big red dog", "q2": "Paris", "unrelated": "ignored"}  # q3 has no prediction
    result = squad_metrics(predictions, references)
    assert result == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(100 * (2 / 3 + 1 + 0) / 3)}


def test_squad_metrics_splits_answerable_and_unanswerable():
    references = {"a": ["Paris"], "b": ["Rome"], "c": [], "d": []}
    predictions = {"a": "paris", "b": "the Roman empire", "c": "London"}  # d missing: correctly abstains
    result = squad_metrics(predictions, references)
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(50.0)
    assert result["has_answer_exact"] == pytest.approx(50.0)
    assert result["has_answer_f1"] == pytest.approx(50.0)
    assert result["no_answer_exact"] == pytest.approx(50.0)
    assert result["no_answer_f1"] == pytest.approx(50.0)
    only_unanswerable = squad_metrics({}, {"x": []})
    assert only_unanswerable == {"exact_match": 100.0, "f1": 100.0}


def test_squad_metrics_rejects_empty_references():
    with pytest.raises(ValueError):
        squad_metrics({}, {})


def test_task_metrics_dispatch_and_primary_metric():
    assert task_metrics("classification", [1, 0], [1, 1], num_labels=2)["accuracy"] == pytest.approx(0.5)
    assert task_metrics("regression", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0])["corr"] == pytest.approx(1.0)
    assert task_metrics("squad", {"q": "a cat"}, {"q": ["cat"]})["exact_match"] == 100.0
    with pytest.raises(ValueError):
        task_metrics("classification", [1], [1])
    with pytest.raises(ValueError):
        task_metrics("ranking", [1], [1])
    assert primary_metric("classification") == "accuracy"
    assert primary_metric("regression") == "corr"
    assert primary_metric("squad") == "f1"
    with pytest.raises(ValueError):
        primary_metric("ranking")
