"""Step time of a run config on a cluster: compute, exposed communication, data; then days and cost.

Compute: the model FLOPs the trainer logs (`train_flops_per_token`: sparse MLM head, attention at the
phase's length, pruned widths) over the GPUs' dense peak times the achieved MFU.
Communication, once per optimizer step (the accumulation boundary):
  dense   ring all-reduce, hierarchical: reduce-scatter / all-gather inside a node over the GPU link
          (2(g-1)/g of the bytes), all-reduce of each GPU's shard between nodes, the g GPUs of a node
          sharing its NIC (2(n-1)/n of the bytes through it); plus a latency per ring hop per bucket;
  ZeRO-1/2 a reduce-scatter of the gradients and an all-gather of the updated weights: half an
          all-reduce each, in the gradients' and the weights' element sizes;
  1-bit   dense during the warmup (`freeze_step`), then the compressed exchange (all-to-all and
          all-gather of packed signs over all ranks, not hierarchical), its bytes from the compressor's
          own count (`compress.bytes_per_call`).
Each collective also costs local work the cluster file may give (`collectives`): summing received
gradient bytes, and the 1-bit stage's per-parameter work; negligible on GPUs, measured on CPUs.
Overlap: with `overlap_comm`, gradient reduction runs during the last micro-batch's backward (2/3 of
its compute); what does not fit is exposed. Data: shards are pre-tokenised and read by a prefetching
thread, so the data term is 0 unless given.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.model.bert import bert_config, count_parameters_of, train_flops_per_token
from pipeline.model.init_from import checkpoint_config
from pipeline.optim.compress import bytes_per_call
from pipeline.plan.cluster import ClusterSpec, LinkSpec

ACTIVATION_BYTES_PER_LAYER_TOKEN_HIDDEN = 34  # half precision, flash attention (Korthikanti et al. 2022)
BUCKET_BYTES = 5e8  # DeepSpeed's default reduce bucket


@dataclass(frozen=True)
class Comm:
    zero_stage: int
    overlap: bool
    grad_bytes: int  # per element on the wire
    weight_bytes: int


@dataclass(frozen=True)
class PhaseCost:
    index: int
    seq_len: int
    steps: int
    global_batch: int
    grad_accum: int
    tokens_per_step: int
    flops_per_step: float
    compute_seconds: float
    comm_seconds: float  # exposed, after overlap
    comm_total_seconds: float
    data_seconds: float
    step_seconds: float
    tokens_per_second: float
    bytes_per_step: float  # sent per GPU


@dataclass
class Plan:
    cluster: str
    gpus: int
    precision: str
    mfu: float
    phases: list[PhaseCost]
    memory: dict
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(p.step_seconds * p.steps for p in self.phases)

    def summary(self, price: float) -> dict:
        seconds = self.seconds
        tokens = sum(p.tokens_per_step * p.steps for p in self.phases)
        comm = sum(p.comm_seconds * p.steps for p in self.phases)
        gpu_hours = seconds / 3600 * self.gpus
        return {"cluster": self.cluster, "gpus": self.gpus, "precision": self.precision, "mfu": self.mfu,
                "days": seconds / 86400, "gpu_hours": gpu_hours, "cost": gpu_hours * price,
                "tokens_per_second": tokens / seconds, "comm_fraction": comm / seconds,
                "phases": [asdict(p) for p in self.phases], "memory": self.memory, "notes": self.notes}


def comm_settings(cfg: RunConfig, precision: str) -> Comm:
    """ZeRO stage, overlap and wire element sizes, read from the run's DeepSpeed config file."""
    path = Path(cfg.distributed.ds_config)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"distributed.ds_config: {path}: {exc}") from None
    zero = ds.get("zero_optimization", {})
    half = 2 if precision in ("bf16", "fp16") else 4
    wire = {"fp32": 4, "fp16": 2, "bf16": 2}.get(ds.get("communication_data_type", ""), half)
    return Comm(int(zero.get("stage", 0)), bool(zero.get("overlap_comm", False)), wire, half)


def ring_seconds(nbytes: float, cluster: ClusterSpec, buckets: int) -> float:
    """Hierarchical ring all-reduce of `nbytes` (per GPU)."""
    g, n = cluster.gpus_per_node, cluster.nodes
    seconds = 0.0
    if g > 1:
        seconds += _link(2 * (g - 1) / g * nbytes, 2 * (g - 1) * buckets, cluster.intra_node)
    if n > 1:
        seconds += _link(2 * (n - 1) / n * nbytes, 2 * (n - 1) * buckets, cluster.inter_node)
    return seconds


def _link(nbytes: float, hops: int, link: LinkSpec) -> float:
    return nbytes * 8 / (link.bandwidth_gbit_s * 1e9) + hops * link.latency_us * 1e-6


def onebit_seconds(params: int, cluster: ClusterSpec, optimizer: str = "onebit_adam") -> tuple[float, float]:
    """(seconds, bytes per GPU) of one compressed exchange over all ranks, with its local work."""
    world, g = cluster.gpus, cluster.gpus_per_node
    sent = bytes_per_call(params, world)
    if world == 1:
        return 0.0, 0.0
    off_node = sent * g * (world - g) / (world - 1)  # what one node's GPUs send to other nodes
    on_node = sent * (g - 1) / (world - 1)
    seconds = _link(on_node, 2 * (g - 1), cluster.intra_node) if g > 1 else 0.0
    if cluster.nodes > 1:
        seconds = max(seconds, _link(off_node, 2 * (world - g), cluster.inter_node))
    local = params * cluster.collectives.onebit_ns_per_element.get(optimizer, 0.0) * 1e-9
    return seconds + local, sent


def dense_comm(params: int, comm: Comm, cluster: ClusterSpec) -> tuple[float, float, float]:
    """(overlappable seconds, not overlappable seconds, bytes per GPU) of one optimizer step."""
    if cluster.gpus == 1:
        return 0.0, 0.0, 0.0
    grads = params * comm.grad_bytes
    buckets = max(1, math.ceil(grads / BUCKET_BYTES))
    share = (cluster.gpus - 1) / cluster.gpus
    summing = grads * share * cluster.collectives.reduce_ns_per_byte * 1e-9  # each GPU sums (n-1)/n of them
    if comm.zero_stage == 0:
        return ring_seconds(grads, cluster, buckets) + summing, 0.0, 2 * grads * share
    weights = params * comm.weight_bytes
    reduce = ring_seconds(grads / 2, cluster, buckets) + summing
    gather = ring_seconds(weights / 2, cluster, buckets)
    return reduce, gather, (grads + weights) * share


@dataclass(frozen=True)
class Options:
    """What a plan may change about the run as configured (the what-if rows)."""

    optimizer: str | None = None  # e.g. onebit_adam instead of the config's
    freeze_fraction: float = 0.15  # 1-bit warmup when the config gives no freeze_step
    widths: list[tuple[int, int]] | None = None  # pruned layer widths (an EarlyBERT ticket)
    step_fraction: float = 1.0  # of each phase's steps


def phase_cost(cfg: RunConfig, cluster: ClusterSpec, mfu: float, index: int, options: Options,
               precision: str, data_seconds: float = 0.0) -> PhaseCost:
    phase = cfg.pretrain.phases[index]
    world = cluster.gpus
    per_step = phase.micro_batch_size * world
    # train.plan_phases checks the same for the ranks of a launch; it lives beside the engine (deepspeed),
    # which planning on a laptop should not need to import
    if phase.global_batch_size % per_step:
        raise ConfigError(f"pretrain.phases.{index}.global_batch_size: {phase.global_batch_size} is not a multiple "
                          f"of micro_batch_size x GPUs = {phase.micro_batch_size} x {world} on {cluster.name}")
    model = _model(cfg)
    tokens = phase.global_batch_size * phase.seq_len
    flops = tokens * train_flops_per_token(model, phase.seq_len, cfg.data.masking.probability,
                                           cfg.model.sparse_mlm_head, options.widths)
    compute = flops / (world * cluster.peak(precision) * mfu)
    params = count_parameters_of(model, options.widths)
    comm = comm_settings(cfg, precision)
    accum = phase.global_batch_size // per_step
    overlappable, after, sent = dense_comm(params, comm, cluster)
    window = (2 / 3) * compute / accum if comm.overlap else 0.0
    exposed, total = max(0.0, overlappable - window) + after, overlappable + after
    optimizer = options.optimizer or cfg.optimizer.name
    if optimizer.startswith("onebit"):  # warmup steps dense (stage 0, no overlap), the rest compressed
        freeze = phase.freeze_step if phase.freeze_step is not None else (
            cfg.optimizer.freeze_step if cfg.optimizer.freeze_step and not options.optimizer
            else round(options.freeze_fraction * phase.steps))
        warm, _, warm_sent = dense_comm(params, Comm(0, False, comm.grad_bytes, comm.weight_bytes), cluster)
        onebit, onebit_sent = onebit_seconds(params, cluster, optimizer)
        share = min(1.0, freeze / phase.steps)
        exposed = total = share * warm + (1 - share) * onebit
        sent = share * warm_sent + (1 - share) * onebit_sent
    step = compute + exposed + data_seconds
    steps = max(1, round(options.step_fraction * phase.steps))
    return PhaseCost(index, phase.seq_len, steps, phase.global_batch_size, accum, tokens, flops, compute, exposed,
                     total, data_seconds, step, tokens / step, sent)


def _model(cfg: RunConfig):
    """The geometry the run trains: the config's, or that of the checkpoint it continues (pretrain.init_from)."""
    if cfg.pretrain.init_from is not None:
        return checkpoint_config(cfg.pretrain.init_from)
    return bert_config(cfg.model, _vocab(cfg))


def _vocab(cfg: RunConfig) -> int:
    tok = cfg.data.tokenizer
    return tok.vocab_size if tok.kind == "train" else 30522  # bert-base-uncased; a vocab_file: BERT's size


def memory_check(cfg: RunConfig, cluster: ClusterSpec, precision: str, widths=None) -> dict:
    """Bytes per GPU: weights, gradients, optimizer state (partitioned by ZeRO), activations of the largest
    micro-batch; says what to change when it does not fit."""
    model = _model(cfg)
    params = count_parameters_of(model, widths)
    comm = comm_settings(cfg, precision)
    half = precision in ("bf16", "fp16")
    state = (4 if half else 0) + 8  # fp32 master (mixed precision) + two moments
    dp = cluster.gpus
    weights = params * comm.weight_bytes
    grads = params * comm.weight_bytes / (dp if comm.zero_stage >= 2 else 1)
    optimizer = params * state / (dp if comm.zero_stage >= 1 else 1)
    act_bytes = ACTIVATION_BYTES_PER_LAYER_TOKEN_HIDDEN * (1 if half else 2)
    worst = max(cfg.pretrain.phases, key=lambda p: p.micro_batch_size * p.seq_len)
    tokens = worst.micro_batch_size * worst.seq_len
    activations = model.num_hidden_layers * tokens * model.hidden_size * act_bytes
    activations += cfg.data.masking.probability * tokens * model.vocab_size * 4  # masked-position logits, fp32
    total = weights + grads + optimizer + activations
    capacity = cluster.gpu.memory_gib * 2**30 * 0.9  # allocator and framework overhead
    out = {"weights_gib": weights / 2**30, "gradients_gib": grads / 2**30, "optimizer_gib": optimizer / 2**30,
           "activations_gib": activations / 2**30, "total_gib": total / 2**30,
           "capacity_gib": capacity / 2**30, "fits": total <= capacity, "advice": ""}
    if not out["fits"]:
        fixed = weights + grads + optimizer
        room = capacity - fixed
        micro = int(worst.micro_batch_size * room / activations) if room > 0 else 0
        out["advice"] = (f"phase seq {worst.seq_len}: micro_batch_size {worst.micro_batch_size} does not fit "
                         f"{cluster.gpu.memory_gib:g} GiB; at most {micro}" if micro >= 1 else
                         "weights and optimizer state alone exceed the GPU: use ZeRO-2 or more GPUs")
    return out


def plan_run(cfg: RunConfig, cluster: ClusterSpec, mfu: float, options: Options = Options()) -> Plan:
    """Every pretrain phase of `cfg` on `cluster`; for an EarlyBERT option, dense search steps first."""
    if not cfg.pretrain.phases:
        raise ConfigError("pretrain.phases: at least one phase is needed to plan a run")
    precision, notes = cfg.pretrain.precision, []
    if precision not in cluster.gpu.peak_tflops:
        fallback = "fp16" if "fp16" in cluster.gpu.peak_tflops else "fp32"
        notes.append(f"{cluster.gpu.name} has no {precision}: planned in {fallback} "
                     f"(--set pretrain.precision={fallback} to train so)")
        precision = fallback
    phases = [phase_cost(cfg, cluster, mfu, i, options, precision) for i in range(len(cfg.pretrain.phases))]
    return Plan(cluster.name, cluster.gpus, precision, mfu, phases,
                memory_check(cfg, cluster, precision, options.widths), notes)


def ticket_widths(cfg: RunConfig) -> list[tuple[int, int]]:
    """Layer widths of an EarlyBERT ticket of the configured ratios (global FFN pruning: the average)."""
    model = _model(cfg)
    head_dim = model.hidden_size // model.num_attention_heads
    heads = model.num_attention_heads - round(cfg.search.head_prune_ratio * model.num_attention_heads)  # as draw_masks
    ffn = round((1 - cfg.search.ffn_prune_ratio) * model.intermediate_size)
    return [(heads * head_dim, ffn)] * model.num_hidden_layers
