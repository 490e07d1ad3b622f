"""plan: the cost model's pieces against hand-computed values, and the command as a user runs it."""

from __future__ import annotations

import json

import yaml

from pipeline.config import load_config
from pipeline.optim.compress import bytes_per_call
from pipeline.plan.cluster import ClusterSpec, load_cluster
from pipeline.plan.costmodel import Options, onebit_seconds, plan_run, ring_seconds
from tests.conftest import REPO, run_cli, write_config

FLAGSHIP = REPO / "configs" / "bert-base-academic.yaml"


def _cluster(nodes: int, gpus: int, intra: float = 800.0, inter: float = 1.0) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "name": "t", "nodes": nodes, "gpus_per_node": gpus, "mfu": 0.5,
        "gpu": {"name": "g", "peak_tflops": {"bf16": 100.0, "fp32": 10.0}, "memory_gib": 40},
        "intra_node": {"bandwidth_gbit_s": intra, "latency_us": 0.0},
        "inter_node": {"bandwidth_gbit_s": inter, "latency_us": 0.0}})


def test_ring_allreduce_is_2_n_minus_1_over_n_of_the_bytes_on_the_slowest_link():
    # two hosts, one GPU each, 1 Gbit/s: 100 MB all-reduced moves 100 MB through each NIC = 0.8 s
    assert abs(ring_seconds(100e6, _cluster(2, 1), buckets=1) - 0.8) < 1e-9
    # 2 nodes x 4 GPUs: 2*3/4 of the bytes inside the node, then 2*1/2 of them through the NIC
    expected = 1.5 * 100e6 * 8 / 800e9 + 1.0 * 100e6 * 8 / 1e9
    assert abs(ring_seconds(100e6, _cluster(2, 4), buckets=1) - expected) < 1e-9


def test_onebit_sends_the_compressors_own_byte_count():
    seconds, sent = onebit_seconds(10_000_000, _cluster(2, 1))
    assert sent == bytes_per_call(10_000_000, 2) and abs(sent - 2 * 10_000_000 / 8 / 2) < 100
    assert abs(seconds - sent * 8 / 1e9) < 1e-9


def test_flagship_plan_on_the_academic_cluster_and_its_what_ifs(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_cli("plan", "--config", str(FLAGSHIP), "--cluster", str(REPO / "clusters/academic-2020.yaml"),
                   "--json", str(out), "--budget-days", "30")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(out.read_text())
    for key in ("days", "gpu_hours", "cost", "gpus", "tokens_per_second"):
        assert plan[key] > 0, key
    assert [p["seq_len"] for p in plan["phases"]] == [128, 512]
    for phase in plan["phases"]:
        assert abs(phase["step_seconds"] - phase["compute_seconds"] - phase["comm_seconds"]
                   - phase["data_seconds"]) < 1e-9
    rows = {r["option"].split(" (")[0]: r for r in plan["what_if"]}
    assert rows["EarlyBERT"]["days"] < plan["days"]  # the ticket's retrain is cheaper per step
    assert rows["onebit_lamb"]["comm_fraction"] < plan["comm_fraction"]
    assert "no bf16" in proc.stdout and out.with_suffix(".png").stat().st_size > 0
    assert all(r["days"] <= 30 for r in plan["within_budget"])


def test_pruned_plan_costs_less_compute_per_step():
    cfg = load_config(FLAGSHIP)
    cluster, mfu = load_cluster(REPO / "clusters/dgx-a100.yaml", REPO)
    dense = plan_run(cfg, cluster, mfu)
    from pipeline.plan.costmodel import ticket_widths

    ticket = plan_run(cfg, cluster, mfu, Options(widths=ticket_widths(cfg)))
    ratio = ticket.phases[0].compute_seconds / dense.phases[0].compute_seconds
    assert 0.55 < ratio < 0.75  # 1/3 of heads and 40% of FFN neurons: about 0.62 of the FLOPs at seq 128


def test_bad_cluster_file_is_one_line_and_exit_2(tmp_path):
    good = yaml.safe_load((REPO / "clusters" / "dgx-a100.yaml").read_text())
    bad = write_config(tmp_path / "bad.yaml", {**good, "nodes": "two"})
    proc = run_cli("plan", "--config", str(FLAGSHIP), "--cluster", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: nodes: Input should be a valid integer, unable to "
                                                "parse string as an integer (got 'two')"]
