"""Downstream evaluation metrics as GLUE and SQuAD define them, for picking and reporting fine-tuned checkpoints."""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# The metric a best checkpoint is chosen by, per task kind.
PRIMARY_METRICS = {"classification": "accuracy", "regression": "corr", "squad": "f1"}

# SQuAD's normalisation drops English articles only as whole words ("theatre" keeps its "the").
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation of predicted class ids against gold ones.

    F1 follows GLUE: for two labels it is the F1 of class 1 (MRPC, QQP report it that way), otherwise macro F1.
    """
    y_pred = np.asarray(predictions)
    y_true = np.asarray(labels)
    if num_labels == 2:
        f1 = f1_score(y_true, y_pred, average="binary", pos_label=1, zero_division=0)
    else:
        # zero_division=0: a class that is never predicted scores 0 instead of warning on every evaluation
        f1 = f1_score(y_true, y_pred, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1),
        "mcc": _matthews(y_true, y_pred),
    }


def _matthews(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Matthews correlation; 0.0 when predictions and labels share one single class (a tiny or degenerate eval)."""
    # sklearn then warns about the confusion matrix shape, though its answer (0.0) is the one GLUE uses
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        return float(matthews_corrcoef(y_true, y_pred))


def _finite_or_zero(value: float) -> float:
    """A correlation undefined for constant input (nan) counts as no correlation, so comparisons stay ordered."""
    value = float(value)
    return value if np.isfinite(value) else 0.0


def regression_metrics(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation, and their mean `corr` (the STS-B score GLUE reports)."""
    x = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    # A collapsed model predicts a constant early in fine-tuning; scipy warns each time and returns nan,
    # which we map to 0.0 anyway, so the warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        pearson = _finite_or_zero(stats.pearsonr(x, y)[0])
        spearman = _finite_or_zero(stats.spearmanr(x, y)[0])
    return {"pearson": pearson, "spearman": spearman, "corr": (pearson + spearman) / 2}


# SQuAD normalisation and EM/F1 are written out here: the official versions live only in the
# evaluation script and in a hub-downloaded `evaluate` metric, neither usable offline or as a library.


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no ASCII punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _gold_answers(golds: Sequence[str]) -> list[str]:
    """Golds that survive normalisation; none means unanswerable (SQuAD v2), scored against the empty answer."""
    kept = [gold for gold in golds if normalize_answer(gold)]
    return kept or [""]


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # only "no answer" matches "no answer"; overlap is meaningless when one side is empty
        return float(pred_tokens == gold_tokens)
    # multiset overlap: a token repeated in both counts as often as it occurs in the rarer side
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    return max(_exact(prediction, gold) for gold in _gold_answers(golds))


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """Best token-level F1 of the prediction over the gold answers."""
    return max(_token_f1(prediction, gold) for gold in _gold_answers(golds))


def _percent_mean(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, averaged over the reference ids, as the official script reports them.

    An id without a prediction is scored as the empty answer. When the references mix answerable and
    unanswerable questions (SQuAD v2), the same two scores are added for each group.
    """
    if not references:
        raise ValueError("squad_metrics needs at least one reference")
    exact: dict[bool, list[float]] = {True: [], False: []}
    f1: dict[bool, list[float]] = {True: [], False: []}
    for qid, golds in references.items():
        prediction = predictions.get(qid, "")
        answerable = _gold_answers(golds) != [""]
        exact[answerable].append(squad_exact(prediction, golds))
        f1[answerable].append(squad_f1(prediction, golds))
    result = {
        "exact_match": _percent_mean(exact[True] + exact[False]),
        "f1": _percent_mean(f1[True] + f1[False]),
    }
    if exact[True] and exact[False]:
        result["has_answer_exact"] = _percent_mean(exact[True])
        result["has_answer_f1"] = _percent_mean(f1[True])
        result["no_answer_exact"] = _percent_mean(exact[False])
        result["no_answer_f1"] = _percent_mean(f1[False])
    return result


def task_metrics(kind: str, predictions, labels, num_labels: int | None = None) -> dict[str, float]:
    """Metrics for a task kind: "classification" (needs num_labels), "regression" or "squad" (id mappings)."""
    if kind == "classification":
        if num_labels is None:
            raise ValueError("classification metrics need num_labels")
        return classification_metrics(predictions, labels, num_labels)
    if kind == "regression":
        return regression_metrics(predictions, labels)
    if kind == "squad":
        return squad_metrics(predictions, labels)
    raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(PRIMARY_METRICS)}")


def primary_metric(kind: str) -> str:
    """The metric a best checkpoint is chosen by (higher is better for all of them)."""
    try:
        return PRIMARY_METRICS[kind]
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(PRIMARY_METRICS)}") from None
