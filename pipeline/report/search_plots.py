"""Search figures: kept heads over time, the FIFO distance against its thresholds, what the ticket keeps.

They take plain values (steps, masks, distances), so the search stage draws them from its live
tracker and the report redraws them from `snapshots.pt` / `history.json` alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the headless backend (imported on use: importing the package costs nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_head_masks(steps: list[int], head_masks: list[np.ndarray], path: Path) -> Path:
    """Rows: layer x head; columns: checks; black = kept."""
    plt = pyplot()
    layers, heads = head_masks[0].shape
    grid = np.stack([m.reshape(-1).astype(float) for m in head_masks], axis=1)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.3 * len(steps) + 2.5), max(3, 0.16 * layers * heads + 1.2)))
    ax.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    every = max(1, len(steps) // 20)
    ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], rotation=90, fontsize=7)
    ax.set_yticks([layer * heads for layer in range(layers)], [f"layer {layer} head 0" for layer in range(layers)],
                  fontsize=7)
    for layer in range(1, layers):
        ax.axhline(layer * heads - 0.5, color="tab:red", linewidth=0.6)
    ax.set_xlabel("training step of the check")
    ax.set_title("attention heads the mask keeps (black) at each check")
    return save(fig, path)


def plot_distances(steps: list[int], head_history: list[float], ffn_history: list[float], head_threshold: float,
                   ffn_threshold: float, emerged_at: int | None, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    # the detector reports a distance once its FIFO is full: align each value with the step that completed it
    for history, threshold, color, name in ((head_history, head_threshold, "tab:blue", "heads"),
                                            (ffn_history, ffn_threshold, "tab:orange", "FFN neurons")):
        ax.plot(steps[len(steps) - len(history):], history, marker="o", markersize=3, color=color, label=name)
        ax.axhline(threshold, color=color, linestyle="--", linewidth=1, label=f"{name} threshold")
    if emerged_at is not None:
        ax.axvline(emerged_at, color="green", linestyle=":", label=f"ticket emerged at step {emerged_at}")
    ax.set_xlabel("training step")
    ax.set_ylabel("max normalised Hamming distance in FIFO")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("mask distance between recent checks (early-bird rule)")
    return save(fig, path)


def plot_kept(plan: dict, heads_per_layer: int, neurons_per_layer: int, path: Path) -> Path:
    """Heads and FFN neurons the ticket keeps in each layer, out of the dense model's."""
    plt = pyplot()
    layers = np.arange(len(plan["heads"]))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, key, full, unit in ((axes[0], "heads", heads_per_layer, "attention heads"),
                                (axes[1], "ffn", neurons_per_layer, "FFN neurons")):
        kept = [len(k) for k in plan[key]]
        ax.bar(layers, [full] * len(layers), color="lightgrey", label="dense")
        ax.bar(layers, kept, color="tab:green", label="ticket keeps")
        ax.set_xticks(layers, [str(i) for i in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{unit} per layer")
        ax.legend(fontsize=7)
    fig.suptitle("what the pruned model keeps")
    return save(fig, path)


def plot_search(tracker, out: Path) -> None:
    """The search stage's own figures, from its live tracker: head_masks.png and distance.png."""
    masks = [tracker.masks_of(snapshot).heads.numpy() for snapshot in tracker.snapshots]
    plot_head_masks(tracker.steps, masks, out / "head_masks.png")
    detector = tracker.detector
    plot_distances(tracker.steps, detector.head_history, detector.ffn_history, detector.head_threshold,
                   detector.ffn_threshold, tracker.emerged_at, out / "distance.png")
