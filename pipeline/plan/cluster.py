"""Cluster descriptions (`clusters/*.yaml`): GPUs, links, prices. Validated like run configs.

A link's bandwidth is what one endpoint can send per direction: per GPU inside a node (NVLink,
PCIe), per node between nodes (the NIC). MFU is the fraction of the GPU's dense peak the model's
own FLOPs reach in a step without communication; it is given, or read from a benchmark result of
this project (`mfu_from`: a JSON file in bench/results and the variant's key in it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config import Fraction, PosInt, Section, load_model_file
from pipeline.errors import ConfigError

PosFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Precision = Literal["bf16", "fp16", "fp32"]


class GpuSpec(Section):
    name: str
    peak_tflops: dict[Precision, PosFloat]  # dense (no structured sparsity), per precision
    memory_gib: PosFloat


class LinkSpec(Section):
    bandwidth_gbit_s: PosFloat
    latency_us: NonNegFloat = 10.0


class CollectiveCosts(Section):
    """Local work a collective adds on each device beyond moving bytes over the links.

    Zero suits GPUs: NCCL reduces inside its copy kernels and 1-bit compression is a few elementwise
    passes at memory bandwidth, both far below the link time. On CPUs over gloo both are measurable:
    `bench/onebit_network.py` derives them at 10 Gbit/s, where the link is not the limit.
    """

    reduce_ns_per_byte: NonNegFloat = 0.0  # summing the received gradient chunks, per byte all-reduced
    # the compressed stage's own work per parameter (error feedback, sign packing, the frozen-state
    # update) beyond a dense step's, per 1-bit optimizer
    onebit_ns_per_element: dict[Literal["onebit_adam", "onebit_lamb"], NonNegFloat] = {}


class MfuSource(Section):
    file: Path  # relative to the repository (or absolute)
    variant: str  # the key of the measured variant in that file


class ClusterSpec(Section):
    name: str
    description: str = ""
    nodes: PosInt
    gpus_per_node: PosInt
    gpu: GpuSpec
    mfu: Fraction | None = None
    mfu_from: MfuSource | None = None
    intra_node: LinkSpec
    inter_node: LinkSpec | None = None  # needed when nodes > 1
    collectives: CollectiveCosts = CollectiveCosts()
    price_per_gpu_hour: NonNegFloat = 0.0  # currency of your choice
    power_watts_per_gpu: PosFloat | None = None  # whole-node draw divided by GPUs, for energy

    @model_validator(mode="after")
    def _complete(self) -> ClusterSpec:
        if (self.mfu is None) == (self.mfu_from is None):
            raise ValueError("give exactly one of mfu (a fraction) and mfu_from (a benchmark result)")
        if self.nodes > 1 and self.inter_node is None:
            raise ValueError(f"inter_node: required for {self.nodes} nodes")
        return self

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def peak(self, precision: Precision) -> float:
        """Dense peak FLOP/s per GPU at `precision`."""
        if precision not in self.gpu.peak_tflops:
            raise ConfigError(f"cluster {self.name}: gpu.peak_tflops has no {precision} entry "
                              f"(has {', '.join(self.gpu.peak_tflops)})")
        return self.gpu.peak_tflops[precision] * 1e12


def load_cluster(path: str | Path, repo: Path | None = None) -> tuple[ClusterSpec, float]:
    """The cluster and the MFU its compute term uses (read from the benchmark file if so named)."""
    path = Path(path)
    cluster = load_model_file(path, ClusterSpec)
    if cluster.mfu is not None:
        return cluster, cluster.mfu
    source = cluster.mfu_from
    file = source.file if source.file.is_absolute() else (repo or Path.cwd()) / source.file
    try:
        measured = json.loads(file.read_text())[source.variant]["mfu"]
    except FileNotFoundError:
        raise ConfigError(f"{path}: mfu_from.file: {file} does not exist") from None
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{path}: mfu_from.variant: {file} has no variant '{source.variant}' with an mfu") from None
    return cluster, float(measured)
