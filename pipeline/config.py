"""Typed run configuration: one YAML file per run, one frozen pydantic model per concern.

A run config is a mapping of sections (`run`, `data`, `model`, ...). Every section has
defaults except `run`, so a config names only what differs. A config may start from another
with `base: other.yaml` (deep-merged, this file wins), and `--set a.b=c` overrides are
applied last. Stages read only the sections they declare, and hash only those, so editing
the finetune section never invalidates a finished prepare stage.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.fingerprint import RUNTIME, flatten

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


StopSignal = Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"]


class RunSection(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    root: Path = Path("runs")  # shared storage every node sees
    seed: int = 1234
    # training stages finish the step, save and exit with code 75 on these; the same command resumes
    stop_signals: list[StopSignal] = ["SIGTERM", "SIGUSR1", "SIGINT"]
    deadline: str | None = None  # "90m" / "12h" from the command's start, or a local ISO time
    deadline_margin_minutes: Annotated[float, Field(ge=0.0)] = 5.0  # stop this long before it (a step + a save)
    progress_seconds: Annotated[float, Field(gt=0.0)] = 30.0  # finetune's progress line (rate, ETA): this often

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str | None) -> str | None:
        if value is not None:
            _deadline_seconds(value, 0.0)
        return value

    def deadline_at(self, started: float) -> float | None:
        """Epoch seconds at which training stops for the deadline (the margin taken off), or None."""
        if self.deadline is None:
            return None
        return _deadline_seconds(self.deadline, started) - 60 * self.deadline_margin_minutes


def _deadline_seconds(value: str, started: float) -> float:
    match = re.match(r"^(\d+(?:\.\d+)?)([smh])$", value.strip())
    if match:
        return started + float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"'{value}' is neither a duration (90m, 12h) nor an ISO time (2026-12-03T06:00)") from None


class SourceConfig(Section):
    kind: Literal["text", "jsonl", "wiki_xml", "hf_disk", "parquet"]
    paths: list[str] = Field(min_length=1)  # files, directories or globs; .gz/.bz2/.zst read too
    text_field: str = "text"  # jsonl, datasets and parquet: which column holds the document
    doc_split: Literal["blank_line", "file", "line"] = "blank_line"  # plain text only

    @model_validator(mode="after")
    def _one_dataset(self) -> SourceConfig:
        if self.kind == "hf_disk" and len(self.paths) != 1:
            raise ValueError("kind 'hf_disk' takes exactly one path (a dataset saved with save_to_disk)")
        return self


class TokenizerConfig(Section):
    # pretrained: the vocab of pretrain.init_from (its vocab.txt, its lowercasing)
    kind: Literal["bert-base-uncased", "vocab_file", "train", "pretrained"] = "bert-base-uncased"
    vocab_file: Path | None = None
    vocab_size: PosInt = 30522  # only for kind=train
    lowercase: bool = True
    min_frequency: PosInt = 2

    @model_validator(mode="after")
    def _vocab_file_given(self) -> TokenizerConfig:
        if self.kind == "vocab_file" and self.vocab_file is None:
            raise ValueError("kind 'vocab_file' needs vocab_file")
        return self


class MaskingConfig(Section):
    probability: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    replace_mask: Fraction = 0.8  # of the chosen tokens: [MASK]
    replace_random: Fraction = 0.1  # random token; the rest stay unchanged
    whole_word: bool = False
    # exactly round(p x maskable tokens) per row, and every batch carries the masked positions padded
    # to a fixed count per sequence length: the sparse MLM head then gathers a static shape (no
    # data-dependent `nonzero`), which a compiled step needs
    fixed_count: bool = False

    @model_validator(mode="after")
    def _shares(self) -> MaskingConfig:
        if self.replace_mask + self.replace_random > 1.0:
            raise ValueError("replace_mask + replace_random must not exceed 1")
        if self.fixed_count and self.whole_word:
            raise ValueError("fixed_count picks tokens, whole_word picks words: choose one")
        return self


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_lengths: list[Annotated[int, Field(ge=16, le=8192)]] = [128, 512]
    objective: Literal["mlm", "nsp", "sop"] = "mlm"
    validation_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.01
    unit_mb: Annotated[float, Field(gt=0.0)] = 64.0  # input per work unit: the grain of parallelism and resume
    workers: NonNegInt = 0  # processes per node; 0 = one per core
    max_line_chars: PosInt = 100_000  # longer lines are skipped and counted
    masking: MaskingConfig = MaskingConfig()


class ModelConfig(Section):
    preset: Literal["tiny", "mini", "small", "medium", "base", "large"] = "base"
    hidden_size: PosInt | None = None  # set any of these to depart from the preset
    num_layers: PosInt | None = None
    num_heads: PosInt | None = None
    intermediate_size: PosInt | None = None
    max_position_embeddings: PosInt = 512
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    # std of the initial weights (HF's initializer_range); 0.02 is BERT's. Tried at 0.0625 on the
    # 256-wide demo model: no faster off the unigram plateau with AdamW, slower with LAMB
    init_std: Annotated[float, Field(gt=0.0)] = 0.02
    sparse_mlm_head: bool = True  # decode only masked positions


class OnebitLambConfig(Section):
    """1-bit LAMB's compression stage (Li et al. 2021; the defaults are the paper's)."""

    coeff_beta: Fraction = 0.9  # running average of each layer's trust ratio over the warmup
    factor_min: Annotated[float, Field(gt=0.0)] = 0.5  # bounds of the frozen ratio's adaptive factor
    factor_max: Annotated[float, Field(gt=0.0)] = 4.0
    factor_threshold: Fraction = 0.1  # most the factor may move in one step, relative


class OptimizerConfig(Section):
    name: Literal["lamb", "adamw", "onebit_adam", "onebit_lamb"] = "lamb"
    lr: Annotated[float, Field(gt=0.0)] = 6e-3
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0.0)] = 1e-6
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    # LAMB and 1-bit LAMB: each layer's trust ratio ||w|| / ||update|| is clipped to this range
    trust_ratio_clip: tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)]] = (0.01, 10.0)
    freeze_step: NonNegInt = 0  # 1-bit optimizers: full-precision warmup steps
    onebit_lamb: OnebitLambConfig = OnebitLambConfig()


class ScheduleConfig(Section):
    warmup: Fraction = 0.2843  # fraction of the phase's steps (the LAMB paper's 128-phase value)
    decay: Literal["poly", "linear", "constant"] = "poly"
    power: Annotated[float, Field(gt=0.0)] = 0.5
    min_lr_ratio: Fraction = 0.0


class PhaseConfig(Section):
    seq_len: Annotated[int, Field(ge=16, le=8192)]
    steps: PosInt
    global_batch_size: PosInt
    micro_batch_size: Annotated[PosInt, RUNTIME]  # the global batch is what the result depends on
    lr: Annotated[float, Field(gt=0.0)] | None = None  # default: optimizer.lr
    warmup: Fraction | None = None  # fraction of this phase's steps (default: schedule.warmup)
    freeze_step: NonNegInt | None = None  # 1-bit optimizers: this phase's warmup (default: optimizer.freeze_step)


class PretrainConfig(Section):
    phases: list[PhaseConfig] = Field(default_factory=list)
    # continue a published BERT (a save_pretrained directory: BertModel, BertForMaskedLM or
    # BertForPreTraining) instead of random weights; its geometry and vocab are the model's
    init_from: Path | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0
    checkpoint_every: Annotated[PosInt, RUNTIME] = 1000
    keep_last: Annotated[PosInt, RUNTIME] = 2
    eval_every: Annotated[PosInt, RUNTIME] = 500
    eval_batches: Annotated[PosInt, RUNTIME] = 20
    log_every: Annotated[PosInt, RUNTIME] = 10
    peak_tflops: Annotated[float, Field(gt=0.0), RUNTIME] = 989.0  # per device, for MFU (H100 bf16 dense)
    compile: Annotated[bool, RUNTIME] = False  # torch.compile the encoder (static shapes per phase); worth it on GPU
    # torch.compile's mode; "reduce-overhead" replays the compiled forward + backward as CUDA graphs
    # (GPU only; it needs the static step: data.masking.fixed_count)
    compile_mode: Annotated[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                            RUNTIME] = "default"


class DistributedConfig(Section):
    ds_config: Path = Path("ds_configs/cpu_demo.json")
    backend: Annotated[Literal["auto", "gloo", "nccl"], RUNTIME] = "auto"
    timeout_minutes: Annotated[PosInt, RUNTIME] = 60


class SearchConfig(Section):
    mode: Literal["earlybird", "fixed", "random"] = "earlybird"
    l1_heads: Annotated[float, Field(ge=0.0)] = 1e-4
    l1_ffn: Annotated[float, Field(ge=0.0)] = 1e-4
    head_prune_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 1 / 3
    ffn_prune_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.4
    head_scope: Literal["layerwise", "global"] = "layerwise"
    ffn_scope: Literal["layerwise", "global"] = "global"
    # every layer keeps a multiple of this many FFN neurons (its highest-scored), so the pruned matrices
    # tile GEMM kernels (64: tensor-core tiles; within noise on CPU, bench/pruned_step_time.py); 1 is
    # EarlyBERT's ticket as drawn
    ffn_multiple: PosInt = 1
    check_every: PosInt = 100
    fifo_size: Annotated[int, Field(ge=2)] = 5
    # the ticket emerges when the newest mask is this close to each mask in the FIFO, heads and FFN
    # neurons apart (normalised Hamming distance; 0.1 is Early-Bird's and EarlyBERT's setting)
    head_distance_threshold: Fraction = 0.1
    ffn_distance_threshold: Fraction = 0.1
    max_steps: PosInt = 2000
    fixed_step: PosInt | None = None  # mode=fixed: draw the ticket at this step


class RetrainConfig(Section):
    rewind: Literal["search_start", "search_end"] = "search_start"
    # the retraining budget: a fraction of every pretrain phase's steps, or per-phase step counts
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    steps: list[PosInt] | None = None
    # rewind=search_end only: count the steps the search already trained toward phase 0, which then
    # runs only the rest of its budget, its learning-rate schedule continuing where the search's was
    continue_search: bool = False

    @model_validator(mode="after")
    def _continue_needs_search_end(self):
        if self.continue_search and self.rewind != "search_end":
            raise ValueError("continue_search needs rewind: search_end (search_start retrains from before the search)")
        return self


class FinetuneTaskConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["classification", "regression", "squad"]
    train: Path  # TSV/CSV/JSONL (classification, regression) or SQuAD JSON
    dev: Path
    test: Path | None = None  # predictions are written; metrics too when it has labels
    format: Literal["auto", "tsv", "csv", "jsonl", "parquet"] = "auto"  # auto: from the file name
    text_column: str = "sentence"
    text_pair_column: str | None = None  # sentence-pair tasks (MRPC, MNLI, ...)
    label_column: str = "label"
    labels: list[str] | None = None  # classification: inferred (sorted) from train when not given
    max_seq_len: Annotated[int, Field(ge=16, le=8192)] = 128
    doc_stride: PosInt = 128  # squad: tokens shared by consecutive windows of a long context
    max_query_len: PosInt = 64  # squad
    version_2: bool = False  # squad v2.0: unanswerable questions, "" is a valid answer
    epochs: PosInt | None = None  # overrides finetune.epochs for this task
    lr: Annotated[float, Field(gt=0.0)] | None = None  # overrides finetune.lr for this task


class FinetuneEarlyBertConfig(Section):
    """EarlyBERT in fine-tuning: search the ticket on the task, prune, fine-tune the ticket."""

    enabled: bool = False
    # the tickets fine-tuned, each a variant of its own: `searched` (the search as `search.mode` says),
    # `random` (the searched ticket's per-layer sizes, its heads and neurons drawn at random: the
    # paper's baseline), `fixed` (drawn at `fixed_fraction` of the first epoch: the paper's own draw)
    tickets: list[Literal["searched", "random", "fixed"]] = Field(default_factory=lambda: ["searched"], min_length=1)
    search: SearchConfig = SearchConfig()  # gates, L1, ratios, FIFO rule: as in pretraining
    # masks are drawn this many times an epoch (at most every step), so the FIFO spans the same share
    # of an epoch on a task of 50 steps as on one of 5,000; null: every `search.check_every` steps
    checks_per_epoch: PosInt | None = 100
    fixed_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2
    search_epochs: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # the search budget (at most)
    search_lr: Annotated[float, Field(gt=0.0)] = 2e-5
    retrain_epochs: PosInt = 2
    retrain_lr: Annotated[float, Field(gt=0.0)] | None = None  # null: the task's fine-tuning lr

    @model_validator(mode="after")
    def _random_needs_searched(self):
        if "random" in self.tickets and "searched" not in self.tickets:
            raise ValueError("tickets: random draws the searched ticket's sizes; list searched too")
        if len(set(self.tickets)) != len(self.tickets):
            raise ValueError(f"tickets must be unique, got {self.tickets}")
        return self


class FinetuneConfig(Section):
    # what to fine-tune: stage names (pretrain, retrain: their export; prune: the pruned weights),
    # scratch (pretrain's architecture from random weights: the control) and/or HF BERT
    # directories; every one on every task, compared side by side
    models: list[str] = Field(default_factory=lambda: ["pretrain"], min_length=1)
    tasks: list[FinetuneTaskConfig] = Field(default_factory=list)
    standard: bool = True  # fine-tune every weight (the dense baseline); false: the tickets only
    epochs: PosInt = 3
    lr: Annotated[float, Field(gt=0.0)] = 2e-5
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    batch_size: PosInt = 32  # global
    eval_batch_size: Annotated[PosInt, RUNTIME] = 128
    warmup: Fraction = 0.1
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # steps; also after every epoch's evaluation and on a stop signal
    checkpoint_every: Annotated[PosInt, RUNTIME] = 500
    earlybert: FinetuneEarlyBertConfig = FinetuneEarlyBertConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> FinetuneConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models must be unique, got {self.models}")
        if not self.standard and not self.earlybert.enabled:
            raise ValueError("standard: false and earlybert.enabled: false leave nothing to fine-tune")
        for model in self.models:
            if model in ("prepare", "search", "finetune"):
                raise ValueError(f"'{model}' writes no model to fine-tune; use pretrain, retrain, prune, scratch "
                                 "or an HF BERT directory")
        return self


class RunConfig(Section):
    run: RunSection
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    pretrain: PretrainConfig = PretrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    search: SearchConfig = SearchConfig()
    retrain: RetrainConfig = RetrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="after")
    def _pretrained_vocab_needs_a_checkpoint(self):
        if self.data.tokenizer.kind == "pretrained" and self.pretrain.init_from is None:
            raise ValueError("data.tokenizer.kind: pretrained takes the vocab of pretrain.init_from, which is not set")
        return self

    def settings(self, sections: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The named sections' fields as dotted names (`pretrain.phases.0.steps`): (what the stage's output
        depends on, with the seed; the RUNTIME fields)."""
        result, runtime = {"run.seed": self.run.seed}, {}
        for name in sections:
            flatten(getattr(self, name), name, result, runtime)
        return result, runtime

    def section_hash(self, sections: tuple[str, ...]) -> str:
        """Content hash of the named sections' result fields (and the seed): what a stage's output depends on."""
        blob = json.dumps(self.settings(sections)[0], sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, merge and validate a run config; any problem is one `ConfigError` line."""
    path = Path(path)
    raw = _read_yaml_chain(path, seen=())
    override_keys = set()
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value, item)
        override_keys.add(key)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, override_keys)) from None


def load_model_file(path: str | Path, model: type[Section]) -> Section:
    """A YAML file validated as `model` (e.g. a cluster description); problems are one ConfigError line."""
    path = Path(path)
    raw = _read_yaml_chain(path, seen=())
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, set(), model)) from None


def _read_yaml_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml_chain((path.parent / str(base)), seen + (path.resolve(),))
    return _deep_merge(parent, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: expected section.field=value")
    try:
        value = yaml.safe_load(text)  # so 8 is an int, [128, 512] a list, true a bool
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    """`a.b.c=v`; a number indexes a list (`pretrain.phases.0.steps=10` changes one phase)."""
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {item}: '{where}' is a list of {len(node)}, '{part}' is not an index in it")
            index: int | str = int(part)
        elif isinstance(node, dict):
            index = part
        else:
            raise ConfigError(f"--set {item}: '{where}' is not a section")
        if depth == len(parts) - 1:
            node[index] = value
        elif isinstance(node, dict):
            node = node.setdefault(index, {})
        else:
            node = node[index]


def _describe(exc: ValidationError, path: Path, override_keys: set[str], root: type[BaseModel] | None = None) -> str:
    """The first validation error as 'file: field: reason' (a user fixes one thing at a time)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    where = f"--set {loc}" if loc in override_keys else (f"{path}: {loc}" if loc else str(path))
    reason = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        reason = "unknown field" + _suggestion(err["loc"], root or RunConfig)
    elif err["type"] == "missing":
        reason = "required field is missing"
    elif "input" in err and not isinstance(err["input"], dict | list):
        reason += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    suffix = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{where}: {reason}{suffix}"


def _suggestion(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        model = _model_of(annotation)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):  # list[SourceConfig], X | None
        found = _model_of(arg)
        if found is not None:
            return found
    return None
