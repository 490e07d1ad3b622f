"""`python -m pipeline env`: what every rank of this launch sees, checked over a real group.

The cheapest way to find a wrong hostfile, a firewalled port or a mismatched interface
before a multi-day run: each rank reports its normalised launch env, then an all-reduce
over the same process group the stages use proves the ranks can talk.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as tdist
from rich.table import Table

from pipeline.console import print_table, setup_logging
from pipeline.dist import Dist, detect
from pipeline.rundir import atomic_write_json


def run_env_check(json_path: str | None) -> int:
    dist = Dist(detect(os.environ))
    log = setup_logging(dist.rank)
    dist.init_process_group()
    env = dist.env
    mine = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
            "local_world_size": env.local_world_size, "node_rank": env.node_rank, "launcher": env.launcher,
            "host": socket.gethostname(), "pid": os.getpid(), "master": f"{env.master_addr}:{env.master_port}"}
    ranks = dist.all_gather_object(mine)
    total = torch.tensor([float(env.rank)])
    if dist.world_size > 1:
        tdist.all_reduce(total)
    expected = dist.world_size * (dist.world_size - 1) / 2
    ok = total.item() == expected and [r["rank"] for r in ranks] == list(range(dist.world_size))
    if dist.is_main:
        table = Table(title=f"launch: {env.launcher}, {env.world_size} rank(s), backend {dist.backend()}")
        for column in mine:
            table.add_column(column)
        for row in ranks:
            table.add_row(*(str(row[c]) for c in mine))
        print_table(0, table)
        log.info(f"all-reduce of ranks: {total.item():g} (expected {expected:g}): {'ok' if ok else 'WRONG'}")
        if json_path:
            atomic_write_json(Path(json_path), {"ranks": ranks, "allreduce_ok": ok})
    dist.shutdown()
    return 0 if ok else 1
