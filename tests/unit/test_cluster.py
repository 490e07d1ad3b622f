"""Cluster files load like run configs: every shipped one validates; a bad field is one line, exit 2."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.plan.cluster import load_cluster
from tests.conftest import REPO, write_config

GOOD = {"name": "c", "nodes": 2, "gpus_per_node": 4,
        "gpu": {"name": "g", "peak_tflops": {"bf16": 100.0}, "memory_gib": 40},
        "mfu": 0.4, "intra_node": {"bandwidth_gbit_s": 800}, "inter_node": {"bandwidth_gbit_s": 100}}


@pytest.mark.parametrize("path", sorted((REPO / "clusters").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_clusters_load(path):
    cluster, mfu = load_cluster(path, REPO)
    assert cluster.gpus >= 1 and 0 < mfu <= 1


def test_mfu_from_a_benchmark_result():
    cluster, mfu = load_cluster(REPO / "clusters" / "h100x8.yaml", REPO)
    assert cluster.gpus == 8 and 0.2 < mfu < 0.25  # the measured "bf16+compile, micro 512" row


@pytest.mark.parametrize("change, message", [
    ({"nodes": 0}, "nodes: Input should be greater than 0"),
    ({"gpu": {**GOOD["gpu"], "peak_tflops": {"int4": 1.0}}}, "gpu.peak_tflops.int4"),
    ({"inter_node": None}, "inter_node: required for 2 nodes"),
    ({"mfu": None}, "give exactly one of mfu"),
    ({"mfu_from": {"file": "bench/results/gpu_pretrain.json", "variant": "nope"}}, "give exactly one of mfu"),
    ({"gpus_per_nodes": 4}, "unknown field (did you mean 'gpus_per_node'?)"),
])
def test_bad_cluster_is_one_line_naming_the_field(tmp_path, change, message):
    path = write_config(tmp_path / "bad.yaml", {**GOOD, **change})
    with pytest.raises(ConfigError) as err:
        load_cluster(path, REPO)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_mfu_from_names_a_missing_variant(tmp_path):
    data = {**GOOD, "mfu": None, "mfu_from": {"file": "bench/results/gpu_pretrain.json", "variant": "nope"}}
    with pytest.raises(ConfigError, match="mfu_from.variant: .* no variant 'nope'"):
        load_cluster(write_config(tmp_path / "c.yaml", data), REPO)
