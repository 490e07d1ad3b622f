"""P7: when does the early-bird ticket emerge in pretraining, and how stable is it across seeds?

Runs the search stage of configs/demo.yaml (mini BERT, BBC News, EarlyBERT defaults: 1/3 of heads
layerwise, 40% of FFN neurons globally, FIFO of 5, head and FFN distances each under 0.1) with 3
seeds, in one run, and reports the step of emergence as a fraction of the demo's phase-1 pretraining
budget, and the pairwise overlap of the tickets' head and FFN masks (1 - normalised Hamming distance).
Writes bench/results/earlybird_emergence.md.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.earlybird import Masks, hamming

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
SEEDS = (1, 2, 3)


def masks_of(plan: dict, layers: int, heads: int, inner: int) -> Masks:
    h = torch.zeros(layers, heads, dtype=torch.bool)
    f = torch.zeros(layers, inner, dtype=torch.bool)
    for layer, kept in enumerate(plan["heads"]):
        h[layer, kept] = True
    for layer, kept in enumerate(plan["ffn"]):
        f[layer, kept] = True
    return Masks(h, f)


def main() -> None:
    cfg = load_config(REPO / "configs/demo.yaml")
    budget = cfg.pretrain.phases[0].steps
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            sets = ["--set", f"run.seed={seed}", "--set", f"run.name=p7-{seed}", "--set", f"run.root={tmp}"]
            for stage in ("prepare", "search"):
                proc = subprocess.run([sys.executable, "-m", "pipeline", stage, "--config", "configs/demo.yaml", *sets],
                                      cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                                      text=True)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
            results[seed] = json.loads((Path(tmp) / f"p7-{seed}" / "search" / "masks.json").read_text())
    layers, heads = len(results[SEEDS[0]]["plan"]["heads"]), results[SEEDS[0]]["heads_total"]
    inner = results[SEEDS[0]]["ffn_total"] // layers
    masks = {s: masks_of(r["plan"], layers, heads // layers, inner) for s, r in results.items()}
    overlap = {f"{a}-{b}": [1 - d for d in hamming(masks[a], masks[b])]
               for a, b in itertools.combinations(SEEDS, 2)}
    lines = [f"configs/demo.yaml search (mini BERT, BBC News), seeds {SEEDS}; budget: the demo's phase-1 pretraining "
             f"of {budget} steps; search cap {cfg.search.max_steps} steps, masks drawn every "
             f"{cfg.search.check_every}.", "", "| seed | ticket at step | fraction of pretraining budget |",
             "|---|---:|---:|"]
    for seed, r in results.items():
        at = r["emerged_at"]
        lines.append(f"| {seed} | {at if at is not None else 'not within cap'} | "
                     f"{'' if at is None else f'{at / budget:.0%}'} |")
    lines += ["", "| seeds | head-mask overlap (1 - Hamming) | FFN-mask overlap |", "|---|---:|---:|"]
    lines += [f"| {pair} | {heads:.3f} | {ffn:.3f} |" for pair, (heads, ffn) in overlap.items()]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "earlybird_emergence.json").write_text(json.dumps({"results": results, "overlap": overlap,
                                                              "budget": budget}, indent=2) + "\n")
    (OUT / "earlybird_emergence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
