"""What `plan` prints (rich tables) and draws (the time breakdown per option, PNG)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from pipeline.console import print_table


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.2f}"


def phase_table(cfg, cluster, result: dict) -> Table:
    table = Table(title=f"plan: {cfg.run.name} on {cluster.name} ({cluster.description}), {result['gpus']} GPUs, "
                        f"{result['precision']}, MFU {result['mfu']:.0%}")
    for column in ("phase", "seq", "steps", "batch", "accum", "step s", "compute s", "comm s (exposed)",
                   "comm s (total)", "data s", "tokens/s", "days"):
        table.add_column(column, justify="right")
    for p in result["phases"]:
        table.add_row(str(p["index"]), str(p["seq_len"]), f"{p['steps']:,}", f"{p['global_batch']:,}",
                      str(p["grad_accum"]), f"{p['step_seconds']:.3f}", f"{p['compute_seconds']:.3f}",
                      f"{p['comm_seconds']:.3f}", f"{p['comm_total_seconds']:.3f}", f"{p['data_seconds']:.3f}",
                      f"{p['tokens_per_second']:,.0f}", _days(p["step_seconds"] * p["steps"]))
    table.add_row("total", "", "", "", "", "", "", "", "", "", f"{result['tokens_per_second']:,.0f}",
                  f"{result['days']:.2f}")
    return table


def what_if_table(result: dict) -> Table:
    table = Table(title="what if")
    for column in ("option", "days", "GPU-hours", "cost", "comm share"):
        table.add_column(column, justify="left" if column == "option" else "right")
    for row in result["what_if"]:
        if "error" in row:
            table.add_row(row["option"], row["error"], "", "", "")
            continue
        table.add_row(row["option"], f"{row['days']:.2f}", f"{row['gpu_hours']:,.0f}", f"{row['cost']:,.0f}",
                      f"{row['comm_fraction']:.0%}")
    return table


def print_plan(cfg, cluster, result: dict) -> None:
    print_table(0, phase_table(cfg, cluster, result), min_width=160)
    memory = result["memory"]
    fits = "fits" if memory["fits"] else f"DOES NOT FIT: {memory['advice']}"
    print(f"total: {result['days']:.2f} days, {result['gpu_hours']:,.0f} GPU-hours, cost {result['cost']:,.0f}, "
          f"{result['comm_fraction']:.0%} of the time in exposed communication")
    print(f"memory per GPU: {memory['total_gib']:.1f} GiB of {memory['capacity_gib']:.1f} usable "
          f"(weights {memory['weights_gib']:.1f}, gradients {memory['gradients_gib']:.1f}, optimizer "
          f"{memory['optimizer_gib']:.1f}, activations {memory['activations_gib']:.1f}): {fits}")
    for note in result["notes"]:
        print(f"note: {note}")
    print_table(0, what_if_table(result), min_width=160)
    if "within_budget" in result:
        table = Table(title=f"options within {result['budget_days']:g} days, cheapest first")
        for column in ("nodes", "GPUs", "1-bit LAMB", "EarlyBERT", "days", "GPU-hours", "cost"):
            table.add_column(column, justify="right")
        for row in result["within_budget"]:
            table.add_row(str(row["nodes"]), str(row["gpus"]), "yes" if row["onebit"] else "no",
                          "yes" if row["earlybert"] else "no", f"{row['days']:.2f}", f"{row['gpu_hours']:,.0f}",
                          f"{row['cost']:,.0f}")
        if not result["within_budget"]:
            table.add_row("none", "", "", "", "", "", "")
        print_table(0, table, min_width=120)


def plot_plan(result: dict, path: Path) -> None:
    """Days per option, split into compute, exposed communication and data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["what_if"] if "error" not in r]
    labels = [r["option"][:40] for r in rows]
    parts = {"compute": [], "communication (exposed)": [], "data": []}
    for r in rows:
        for name, key in (("compute", "compute_seconds"), ("communication (exposed)", "comm_seconds"),
                          ("data", "data_seconds")):
            parts[name].append(sum(p[key] * p["steps"] for p in r["phases"]) / 86400)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for name, values in parts.items():
        ax.barh(labels, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock days")
    ax.set_title(f"{result['config']} on {result['cluster']}: time per option")
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
