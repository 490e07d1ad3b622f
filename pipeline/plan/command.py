"""`python -m pipeline plan --config FILE --cluster FILE [--json OUT] [--budget-days N] [--set a.b=c ...]`.

Prints, per pretrain phase and in total, the step time split into compute, exposed communication and
data, tokens/s, wall days, GPU-hours and cost on the cluster; then what-if rows (1-bit Adam/LAMB,
EarlyBERT, the other shipped clusters) and, with --budget-days, the options that fit the budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError
from pipeline.plan.cluster import ClusterSpec, load_cluster
from pipeline.plan.costmodel import Options, Plan, plan_run, ticket_widths
from pipeline.plan.render import plot_plan, print_plan
from pipeline.rundir import atomic_write_json

REPO = Path(__file__).resolve().parents[2]


def earlybert(cfg: RunConfig, cluster: ClusterSpec, mfu: float, dense: Plan, optimizer: str | None = None) -> dict:
    """Search (dense, at most search.max_steps of phase 0), then the ticket's retrain budget."""
    ticket = plan_run(cfg, cluster, mfu, Options(optimizer=optimizer, widths=ticket_widths(cfg),
                                                 step_fraction=cfg.retrain.fraction))
    search_steps = min(cfg.search.max_steps, dense.phases[0].steps)
    phases = list(ticket.phases)
    if cfg.retrain.continue_search:  # the searched steps count toward phase 0
        first = phases[0]
        phases[0] = dataclasses.replace(first, steps=max(0, first.steps - search_steps))
    combined = Plan(cluster.name, cluster.gpus, ticket.precision, mfu,
                    [dataclasses.replace(dense.phases[0], steps=search_steps)] + phases, ticket.memory, ticket.notes)
    return combined.summary(cluster.price_per_gpu_hour)


def what_if(cfg: RunConfig, cluster: ClusterSpec, mfu: float, dense: Plan) -> list[dict]:
    rows = [{"option": "as configured", **dense.summary(cluster.price_per_gpu_hour)}]
    for name in ("onebit_adam", "onebit_lamb"):
        if name != cfg.optimizer.name:
            plan = plan_run(cfg, cluster, mfu, Options(optimizer=name))
            rows.append({"option": f"{name} (warmup 15% of each phase)", **plan.summary(cluster.price_per_gpu_hour)})
    rows.append({"option": f"EarlyBERT (search ≤ {cfg.search.max_steps} steps, retrain {cfg.retrain.fraction:.0%})",
                 **earlybert(cfg, cluster, mfu, dense)})
    rows.append({"option": "EarlyBERT + onebit_lamb", **earlybert(cfg, cluster, mfu, dense, "onebit_lamb")})
    for path in sorted((REPO / "clusters").glob("*.yaml")):
        other, other_mfu = load_cluster(path, REPO)
        if other.name in (cluster.name, "this-machine"):
            continue
        try:
            plan = plan_run(cfg, other, other_mfu)
        except ConfigError as exc:  # e.g. a batch that does not divide over its GPUs: say so in the row
            rows.append({"option": f"on {other.name}", "error": str(exc)})
            continue
        rows.append({"option": f"on {other.name} ({other.description})", **plan.summary(other.price_per_gpu_hour)})
    return rows


def budget_options(cfg: RunConfig, cluster: ClusterSpec, mfu: float, days: float) -> list[dict]:
    """Node counts x 1-bit x EarlyBERT on this cluster's kind of node, those within `days`, cheapest first."""
    rows = []
    for nodes in range(1, cluster.nodes + 1):
        sized = cluster.model_copy(update={"nodes": nodes})
        for onebit in (None, "onebit_lamb"):
            try:
                dense = plan_run(cfg, sized, mfu, Options(optimizer=onebit))
            except ConfigError:  # the global batch does not divide over this many GPUs
                continue
            for ticket in (False, True):
                price = sized.price_per_gpu_hour
                summary = earlybert(cfg, sized, mfu, dense, onebit) if ticket else dense.summary(price)
                if summary["days"] <= days:
                    rows.append({"nodes": nodes, "gpus": sized.gpus, "onebit": bool(onebit), "earlybert": ticket,
                                 "days": summary["days"], "cost": summary["cost"], "gpu_hours": summary["gpu_hours"]})
    return sorted(rows, key=lambda r: (r["cost"], r["days"]))


def run_plan(config: str, cluster_path: str, overrides: list[str], json_out: str | None,
             budget_days: float | None) -> int:
    cfg = load_config(config, overrides)
    cluster, mfu = load_cluster(cluster_path, REPO)
    dense = plan_run(cfg, cluster, mfu)
    result = {**dense.summary(cluster.price_per_gpu_hour), "config": str(config), "what_if": what_if(cfg, cluster,
                                                                                                   mfu, dense)}
    if budget_days is not None:
        result["budget_days"], result["within_budget"] = budget_days, budget_options(cfg, cluster, mfu, budget_days)
    print_plan(cfg, cluster, result)
    if json_out:
        atomic_write_json(Path(json_out), result)
        plot_plan(result, Path(json_out).with_suffix(".png"))
    return 0
