"""Plots from a run directory (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_search(tracker, out: Path) -> None:
    """head_masks.png: which heads each check kept (layers x heads, over time); distance.png: the FIFO distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = [tracker.masks_of(snapshot).heads.reshape(-1).float() for snapshot in tracker.snapshots]
    grid = torch.stack(masks, dim=1).numpy()  # rows: layer*heads + head, columns: checks
    layers, heads = tracker.snapshots[0]["heads"].shape
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(masks) + 2), max(3, 0.12 * layers * heads + 1)))
    ax.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xticks(range(len(tracker.steps)), [str(s) for s in tracker.steps], rotation=90, fontsize=6)
    ax.set_yticks([layer * heads for layer in range(layers)], [f"layer {layer}" for layer in range(layers)], fontsize=6)
    ax.set_xlabel("step")
    ax.set_title("kept attention heads (black) at each check")
    fig.tight_layout()
    fig.savefig(out / "head_masks.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    detector = tracker.detector
    for history, threshold, color, name in ((detector.head_history, detector.head_threshold, "tab:blue", "heads"),
                                            (detector.ffn_history, detector.ffn_threshold, "tab:orange", "FFN")):
        ax.plot(tracker.steps, history, marker="o", color=color, label=f"{name}")
        ax.axhline(threshold, color=color, linestyle="--", linewidth=1, label=f"{name} threshold")
    if tracker.emerged_at is not None:
        ax.axvline(tracker.emerged_at, color="green", linestyle=":", label=f"ticket at {tracker.emerged_at}")
    ax.set_xlabel("training step")
    ax.set_ylabel("max normalised Hamming distance in FIFO")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "distance.png", dpi=120)
    plt.close(fig)
