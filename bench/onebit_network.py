"""P5: 1-bit Adam vs dense all-reduce on a slow network, two "hosts" on this machine.

Builds two network namespaces joined by a veth pair shaped with tc (a token-bucket rate limit of
1 Gbit/s, then 10 Gbit/s), runs one rank of a BERT-small data-parallel pretraining
step loop in each (gloo over the veth, DeepSpeed engine, ZeRO-0, fp32), and measures, in one run:
bytes each rank sends per step and the time per step, for
  dense   Adam, gradients all-reduced in fp32 by the engine
  1-bit   1-bit Adam after a 2-step warmup: momentum exchanged at 1 bit per element
Model input is random token ids (the network, not the data, is under test); micro-batch 2 x 128
tokens keeps the step communication-bound at 1 Gbit/s. The script only talks to its own
namespaces' addresses and removes them at the end. Without permission to create namespaces it
says so and reports bytes from a loopback run.
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

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
NS = ("bp1host0", "bp1host1")
DEV = ("bp1veth0", "bp1veth1")
ADDR = ("10.231.7.1", "10.231.7.2")
STEPS, TIMED, MICRO, SEQ = 8, 5, 2, 128


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_hosts(rate: str) -> bool:
    drop_hosts()
    try:
        for ns in NS:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", DEV[0], "type", "veth", "peer", "name", DEV[1])
        for ns, dev, addr in zip(NS, DEV, ADDR):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            # tbf: a token-bucket rate limit (netem is not available on every kernel)
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
               "burst", "1mb", "latency", "100ms")
        return True
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"network namespaces unavailable ({exc}); reporting bytes from a loopback run only")
        drop_hosts()
        return False


def drop_hosts() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_pair(mode: str, tmp: Path, namespaced: bool) -> dict:
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": ADDR[0] if namespaced else "127.0.0.1", "MASTER_PORT": "29931",
               "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        if namespaced:
            env["GLOO_SOCKET_IFNAME"] = DEV[rank]
        cmd = [sys.executable, __file__, "--worker", mode, str(tmp / f"{mode}.json")]
        if namespaced:
            cmd = ["ip", "netns", "exec", NS[rank]] + cmd
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{mode} run failed:\n" + logs[0][-3000:] + logs[1][-3000:])
    return json.loads((tmp / f"{mode}.json").read_text())


def worker(mode: str, out: Path) -> None:
    import torch

    from pipeline.config import ModelConfig, OptimizerConfig
    from pipeline.dist import Dist, detect
    from pipeline.engine import BatchPlan, Engine, ds_config
    from pipeline.model.bert import PretrainObjective, bert_config, build_model
    from pipeline.optim.build import build_optimizer

    torch.set_num_threads(1)
    dist = Dist(detect(os.environ))
    torch.manual_seed(0)
    model = PretrainObjective(build_model(bert_config(ModelConfig(preset="small", dropout=0.0), 30522), False))
    freeze = 2 if mode == "onebit" else 10**6  # dense: the same optimizer, never compressing
    optimizer = build_optimizer(OptimizerConfig(name="onebit_adam", lr=1e-4, freeze_step=freeze), model, 1e-4)
    cfg = ds_config(REPO / "ds_configs/pretrain_onebit_adam.json", BatchPlan(MICRO, 1, 2, "fp32", 1.0),
                    compressed=True)
    engine = Engine(model, optimizer, None, cfg, dist)
    gen = torch.Generator().manual_seed(dist.rank)
    times, sent = [], []
    for _ in range(STEPS):
        ids = torch.randint(5, 30522, (MICRO, SEQ), generator=gen)
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
        before, start = engine.comm_bytes(), time.perf_counter()
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                      labels=labels).loss
        engine.backward(loss)
        engine.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
        sent.append(engine.comm_bytes() - before)
    if dist.is_main:
        params = sum(p.numel() for p in model.parameters())
        out.write_text(json.dumps({"seconds_per_step": sum(times[-TIMED:]) / TIMED,
                                   "bytes_per_step": sum(sent[-TIMED:]) / TIMED, "parameters": params}))


def main() -> None:
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rate in ("1gbit", "10gbit"):
            namespaced = make_hosts(rate)
            label = rate if namespaced else "loopback"
            try:
                results[label] = {mode: run_pair(mode, Path(tmp), namespaced) for mode in ("dense", "onebit")}
            finally:
                drop_hosts()
            if not namespaced:
                break
    lines = ["BERT-small (4 layers, hidden 512, vocab 30522), 2 ranks in 2 network namespaces joined by a veth pair "
             f"(tc tbf rate limit), gloo, fp32, micro-batch {MICRO} x {SEQ}; mean of the last {TIMED} "
             "of {STEPS} steps (1-bit: compressed from step 3).".replace("{STEPS}", str(STEPS)), "",
             "| link | mode | bytes sent per step per rank | bytes ratio | seconds per step | speed-up |",
             "|---|---|---:|---:|---:|---:|"]
    for link, modes in results.items():
        dense = modes["dense"]
        for mode, r in modes.items():
            ratio = r["bytes_per_step"] / dense["bytes_per_step"]
            speed = dense["seconds_per_step"] / r["seconds_per_step"]
            lines.append(f"| {link} | {mode} | {r['bytes_per_step'] / 1e6:,.2f} MB | 1/{1 / ratio:.1f} "
                         f"| {r['seconds_per_step']:.3f} | {speed:.2f}x |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "onebit_network.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "onebit_network.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
