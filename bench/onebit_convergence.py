"""Does 1-bit training converge? 1-bit Adam vs AdamW and 1-bit LAMB vs LAMB through the pipeline, side by side.

Real text (BBC News, the demo corpus and its 8k trained vocab), the `mini` preset, 2 ranks on two
"hosts" (network namespaces joined by a veth pair, one rank each, torchrun across them, gloo over the
veth), MLM only, fp32. Two suites, each run by all four optimizers from the same prepared data,
seed and schedule, at equal steps:
  one phase    seq 128 < max_position_embeddings 256 (positions 128..255 never train)
  two phases   seq 128, then a second phase at seq 256 (each phase has its own 1-bit warmup)
The 1-bit warmup (freeze_step) is 20% of each phase's steps, as the papers advise. Reported per run:
final validation MLM loss of every phase, its gap to the full-precision optimizer's, and bytes per
step counted on the veth interfaces (all traffic: gradients, momentum, evaluation, barriers), beside
the optimizer's own count for the warmup and the compressed steps.
usage: python bench/onebit_convergence.py   (as root; `make data` first)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hosts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
ROOT = REPO / "runs" / "bench-onebit"
LR = {"adamw": 1e-3, "onebit_adam": 1e-3, "lamb": 2e-3, "onebit_lamb": 2e-3}
SUITES = {
    "one phase": [{"seq_len": 128, "steps": 160, "global_batch_size": 32, "micro_batch_size": 16}],
    "two phases": [{"seq_len": 128, "steps": 100, "global_batch_size": 32, "micro_batch_size": 16},
                   {"seq_len": 256, "steps": 40, "global_batch_size": 16, "micro_batch_size": 8}],
}
PAIRS = (("onebit_adam", "adamw"), ("onebit_lamb", "lamb"))


def config(name: str, optimizer: str, phases: list[dict]) -> Path:
    phases = [{**p, "freeze_step": p["steps"] // 5} for p in phases]
    cfg = {"run": {"name": name, "root": str(ROOT), "seed": 1234},
           "data": {"sources": [{"kind": "text", "paths": [str(REPO / ".cache/corpora/bbc")], "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 8192}, "seq_lengths": [128, 256],
                    "validation_fraction": 0.05, "unit_mb": 1},
           "model": {"preset": "mini", "max_position_embeddings": 256},
           "optimizer": {"name": optimizer, "lr": LR[optimizer]},
           "schedule": {"warmup": 0.2, "decay": "poly", "power": 0.5},
           "pretrain": {"phases": phases, "precision": "fp32", "checkpoint_every": 1000, "eval_every": 1000,
                        "eval_batches": 20, "log_every": 10, "peak_tflops": 0.075},
           "distributed": {"ds_config": str(REPO / "ds_configs/pretrain_onebit_adam.json")}}
    path = ROOT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    return {**keep, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def pretrain_across_hosts(path: Path, log: Path, metrics: Path) -> tuple[float, list[tuple[int, int, int]]]:
    """One rank per host through torchrun's static rendezvous.

    Returns the wall seconds and samples (phase, step, bytes on the link so far), taken whenever a
    new log line appears, so the link's bytes per step can be read off for warmup and compressed steps.
    """
    torchrun = str(Path(sys.executable).parent / "torchrun")
    start, procs, samples, seen = time.time(), [], [], 0
    with log.open("w") as out:
        for host in range(2):
            cmd = [torchrun, "--nnodes", "2", "--node_rank", str(host), "--nproc_per_node", "1",
                   "--master_addr", hosts.ADDR[0], "--master_port", "29950", "-m", "pipeline", "pretrain",
                   "--config", str(path)]
            procs.append(hosts.in_host(host, cmd, env(), REPO, stdout=out, stderr=subprocess.STDOUT))
        while any(p.poll() is None for p in procs):
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if len(lines) > seen:
                last = json.loads(lines[-1]) if lines[-1].endswith("}") else None
                if last is not None:
                    samples.append((last["phase"], last["step"], hosts.link_bytes()))
                    seen = len(lines)
            time.sleep(0.1)
        codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{path.name} failed ({codes}); see {log}")
    return time.time() - start, samples


def per_step(samples: list[tuple[int, int, int]], phase: int, lo: int, hi: int) -> float:
    """Link bytes per step between the first and last samples of `phase` with lo <= step <= hi."""
    inside = [(s, b) for p, s, b in samples if p == phase and lo <= s <= hi]
    if len(inside) < 2:
        return float("nan")
    (s0, b0), (s1, b1) = inside[0], inside[-1]
    return (b1 - b0) / (s1 - s0)


def measure(suite: str, optimizer: str, phases: list[dict]) -> dict:
    name = f"{suite.replace(' ', '')}-{optimizer}"
    path = config(name, optimizer, phases)
    run_dir = ROOT / name
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    (run_dir / "prepare").symlink_to(ROOT / "prepared" / "prepare")
    before = hosts.link_bytes()
    seconds, samples = pretrain_across_hosts(path, ROOT / f"{name}.log", run_dir / "pretrain/metrics.jsonl")
    link = hosts.link_bytes() - before
    metrics = json.loads((run_dir / "pretrain/stage.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (run_dir / "pretrain/metrics.jsonl").read_text().splitlines()]
    steps = sum(p["steps"] for p in phases)
    result = {"steps": steps, "seconds": seconds, "link_bytes_per_step": link / steps, "samples": samples,
              "final_eval_loss": [metrics[f"phase{i}_final_eval_loss"] for i in range(len(phases))],
              "initial_eval_loss": metrics["phase0_initial_eval_loss"]}
    for i, phase in enumerate(phases):  # on the link and by the optimizer's own count, warmup vs compressed
        freeze, end = phase["steps"] // 5, phase["steps"] - 1  # the last step adds the final evaluation
        result[f"phase{i}_link_warmup"] = per_step(samples, i, 1, freeze)
        result[f"phase{i}_link_compressed"] = per_step(samples, i, freeze + 1, end)
        logged = [(r["step"], r["comm_bytes_per_step"]) for r in rows
                  if r.get("phase") == i and "comm_bytes_per_step" in r]
        result[f"phase{i}_counted_warmup"] = max((b for s, b in logged if s <= freeze), default=0.0)
        result[f"phase{i}_counted_compressed"] = max((b for s, b in logged if s > freeze + 10), default=0.0)
    return result


def table(results: dict) -> list[str]:
    lines = ["| suite | optimizer | steps | final validation MLM loss (per phase) | vs full precision | "
             "link bytes/step (both directions), phase 0: warmup → compressed | compressed / dense | "
             "counted by the optimizer (per rank) | wall |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for suite, runs in results.items():
        for onebit, reference in PAIRS:
            dense = runs[reference]["phase0_link_warmup"]
            for name in (reference, onebit):
                r = runs[name]
                losses = " → ".join(f"{x:.3f}" for x in r["final_eval_loss"])
                gap = "" if name == reference else \
                    f"{100 * (r['final_eval_loss'][-1] / runs[reference]['final_eval_loss'][-1] - 1):+.2f}%"
                if name == onebit:
                    link = f"{r['phase0_link_warmup'] / 1e6:.2f} MB → {r['phase0_link_compressed'] / 1e6:.3f} MB"
                    ratio = f"1/{dense / r['phase0_link_compressed']:.1f}"
                    counted = (f"{r['phase0_counted_warmup'] / 1e6:.2f} MB → "
                               f"{r['phase0_counted_compressed'] / 1e6:.3f} MB")
                else:
                    link, ratio, counted = f"{dense / 1e6:.2f} MB", "", f"{r['phase0_counted_warmup'] / 1e6:.2f} MB"
                lines.append(f"| {suite} | {name} | {r['steps']} | {losses} | {gap} | {link} | {ratio} | {counted} "
                             f"| {r['seconds']:.0f} s |")
    return lines


def write(results: dict) -> None:
    head = ("1-bit vs full precision through the pipeline: BBC News, `mini` (4 layers, hidden 256, 8k vocab), "
            "2 ranks on two network namespaces (gloo over a veth pair, unshaped), fp32, MLM, 1-bit warmup 20% of "
            "each phase; AdamW/1-bit Adam lr 1e-3, LAMB/1-bit LAMB lr 2e-3; validation loss on 20 fixed batches. "
            "Produced by `python bench/onebit_convergence.py`.")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "onebit_convergence.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "onebit_convergence.md").write_text("\n".join([head, "", *table(results)]) + "\n")
    print("\n".join(table(results)))


def main() -> None:
    reason = hosts.available()
    if reason:
        raise SystemExit(f"onebit_convergence: {reason}")
    ROOT.mkdir(parents=True, exist_ok=True)
    prepared = config("prepared", "adamw", SUITES["one phase"])
    if not (ROOT / "prepared/prepare/stage.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--config", str(prepared)], cwd=REPO, env=env(),
                       check=True)
    results: dict[str, dict] = {}
    hosts.make_hosts(None)
    try:
        for suite, phases in SUITES.items():
            results[suite] = {opt: measure(suite, opt, phases) for opt in LR}
            print("\n".join(table({suite: results[suite]})), flush=True)
    finally:
        hosts.drop_hosts()
    write(results)


if __name__ == "__main__":
    main()
