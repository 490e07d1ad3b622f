"""P5/P6: 1-bit Adam and 1-bit LAMB vs dense all-reduce on slow links, two "hosts" on this machine.

Two network namespaces joined by a veth pair shaped with tc (token-bucket rate limits of 200 Mbit/s,
1 Gbit/s and 10 Gbit/s), one rank of a BERT-small data-parallel step loop in each (gloo over the
veth, DeepSpeed engine, ZeRO-0, fp32), measured in one run:
  dense        AdamW's arithmetic with the engine's fp32 gradient all-reduce (a 1-bit Adam never frozen)
  onebit_adam  1-bit Adam after a 2-step warmup: momentum exchanged at 1 bit per element
  onebit_lamb  1-bit LAMB after a 2-step warmup
  local        one rank alone, no communication: the compute part of a step
Bytes per step are read from the veth's kernel counters around the timed steps (what crossed the
link), next to what the optimizer handed to its collectives. Optimizer state is measured as the
bytes of every tensor the optimizer keeps between steps. Model input is random token ids (the
network, not the data, is under test); micro-batch 2 x 128 tokens keeps the step
communication-bound on slow links. The script only talks to its own namespaces' addresses and
removes them at the end.
usage: python bench/onebit_network.py            (as root)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hosts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
STEPS, TIMED, MICRO, SEQ = 8, 5, 2, 128
RATES = ("200mbit", "1gbit", "10gbit")
MODES = ("dense", "onebit_adam", "onebit_lamb")


def run_pair(mode: str, tmp: Path, preset: str = "small") -> dict:
    """One rank in each namespace (made by the caller); returns rank 0's measurements."""
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": hosts.ADDR[0], "MASTER_PORT": "29931", "PYTHONPATH": str(REPO),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "BENCH_DEV": hosts.DEV[rank]}
        cmd = [sys.executable, __file__, "--worker", mode, str(tmp / f"{mode}.json"), preset]
        procs.append(hosts.in_host(rank, cmd, env, REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{mode} run failed:\n" + logs[0][-3000:] + logs[1][-3000:])
    return json.loads((tmp / f"{mode}.json").read_text())


def run_local(tmp: Path) -> dict:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29932", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--worker", "local", str(tmp / "local.json")], env=env, check=True,
                   capture_output=True)
    return json.loads((tmp / "local.json").read_text())


def link_tx() -> int:
    dev = os.environ.get("BENCH_DEV")
    return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text()) if dev else 0


def worker(mode: str, out: Path, preset: str = "small") -> None:
    import torch

    from pipeline.config import ModelConfig, OptimizerConfig
    from pipeline.dist import Dist, detect
    from pipeline.engine import BatchPlan, Engine, ds_config
    from pipeline.model.bert import PretrainObjective, bert_config, build_model
    from pipeline.optim.build import build_optimizer

    torch.set_num_threads(1)
    dist = Dist(detect(os.environ))
    torch.manual_seed(0)
    model = PretrainObjective(build_model(bert_config(ModelConfig(preset=preset, dropout=0.0), 30522), False))
    name = "onebit_adam" if mode in ("dense", "local") else mode
    freeze = 2 if mode.startswith("onebit") else 10**6  # dense: the same optimizer, never compressing
    optimizer = build_optimizer(OptimizerConfig(name=name, lr=1e-4, freeze_step=freeze), model, 1e-4)
    cfg = ds_config(REPO / "ds_configs/pretrain_onebit_adam.json", BatchPlan(MICRO, 1, dist.world_size, "fp32", 1.0),
                    compressed=True)
    engine = Engine(model, optimizer, None, cfg, dist)
    gen = torch.Generator().manual_seed(dist.rank)
    times, sent, link = [], [], []
    for _ in range(STEPS):
        ids = torch.randint(5, 30522, (MICRO, SEQ), generator=gen)
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
        dist.barrier()
        before, on_link, start = engine.comm_bytes(), link_tx(), time.perf_counter()
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                      labels=labels).loss
        engine.backward(loss)
        engine.step()
        if dist.world_size > 1:
            torch.distributed.barrier()  # the step ends when every rank has its update
        times.append(time.perf_counter() - start)
        sent.append(engine.comm_bytes() - before)
        link.append(link_tx() - on_link)
    if dist.is_main:
        params = sum(p.numel() for p in model.parameters())
        out.write_text(json.dumps({"seconds_per_step": sum(times[-TIMED:]) / TIMED,
                                   "counted_bytes_per_step": sum(sent[-TIMED:]) / TIMED,
                                   "link_bytes_per_step": sum(link[-TIMED:]) / TIMED, "parameters": params,
                                   "state_bytes_per_param": optimizer.state_bytes() / params}))


def calibration(results: dict, rate: str = "10gbit") -> dict:
    """The collectives' local work for a cluster file (`collectives:`), from the fastest link's rows: what a
    step takes beyond the lone rank's compute and the bytes' time on the link is work at the endpoints.
    Dense: gloo summing the received half of the gradients (2 ranks: (n-1)/n of the fp32 bytes);
    1-bit: the compressed stage's per-parameter work."""
    local, rows = results["local"]["seconds_per_step"], results[rate]
    bits_per_s = float(rate.removesuffix("gbit")) * 1e9
    params = results["local"]["parameters"]

    def excess(mode: str) -> float:
        row = rows[mode]
        return max(0.0, row["seconds_per_step"] - local - row["counted_bytes_per_step"] * 8 / bits_per_s)

    return {"measured_at": rate, "reduce_ns_per_byte": excess("dense") / (params * 4 / 2) * 1e9,
            "onebit_ns_per_element": {m: excess(m) / params * 1e9 for m in ("onebit_adam", "onebit_lamb")}}


def main() -> None:
    reason = hosts.available()
    if reason:
        raise SystemExit(f"onebit_network: {reason}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        local = run_local(Path(tmp))
        for rate in RATES:
            hosts.make_hosts(rate)
            try:
                results[rate] = {mode: run_pair(mode, Path(tmp)) for mode in MODES}
            finally:
                hosts.drop_hosts()
    results["local"] = local
    results["calibration"] = calibration(results)
    lines = [f"BERT-small (4 layers, hidden 512, vocab 30522, {local['parameters'] / 1e6:.1f}M parameters), 2 ranks in "
             "2 network namespaces joined by a veth pair (tc tbf rate limit), gloo, fp32, micro-batch "
             f"{MICRO} x {SEQ}; mean of the last {TIMED} of {STEPS} steps (1-bit: compressed from step 3). "
             f"Compute alone (1 rank, no communication): {local['seconds_per_step']:.3f} s per step. "
             "Produced by `python bench/onebit_network.py`.", "",
             "| link | mode | bytes per step on the link (this rank) | counted by the optimizer | link bytes ratio "
             "| seconds per step | share in communication | speed-up | optimizer state per parameter |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for link, modes in results.items():
        if link in ("local", "calibration"):
            continue
        dense = modes["dense"]
        for mode, r in modes.items():
            comm = max(0.0, 1 - local["seconds_per_step"] / r["seconds_per_step"])
            lines.append(f"| {link} | {mode} | {r['link_bytes_per_step'] / 1e6:,.2f} MB | "
                         f"{r['counted_bytes_per_step'] / 1e6:,.2f} MB | "
                         f"1/{dense['link_bytes_per_step'] / r['link_bytes_per_step']:.1f} | "
                         f"{r['seconds_per_step']:.3f} | {100 * comm:.0f}% | "
                         f"{dense['seconds_per_step'] / r['seconds_per_step']:.2f}x | "
                         f"{r['state_bytes_per_param']:.2f} B |")
    cal = results["calibration"]
    lines += ["", f"Local work of the collectives at {cal['measured_at']} (for a cluster file's `collectives:`): "
              f"summing {cal['reduce_ns_per_byte']:.2f} ns per gradient byte, 1-bit stage "
              + ", ".join(f"{m} {v:.1f} ns" for m, v in cal["onebit_ns_per_element"].items()) + " per parameter."]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "onebit_network.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "onebit_network.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), *sys.argv[4:5])
    else:
        main()
