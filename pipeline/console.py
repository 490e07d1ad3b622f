"""Console output: rich logging and progress bars that only rank 0 shows.

Other ranks log warnings and errors only, so a 64-rank job prints one story, not 64.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def setup_logging(rank: int, level: int = logging.INFO) -> logging.Logger:
    """Configure the `pipeline` logger for this rank (idempotent)."""
    logger = logging.getLogger("pipeline")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level if rank == 0 else logging.WARNING)
    # Logs captured to a file must not wrap at rich's default 80 columns.
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False,
                          log_time_format="[%X]")
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    logger.addHandler(handler)
    from transformers.utils import logging as hf_logging  # here, not at import: importing transformers is slow

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per save would drown the log
    return logger


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"pipeline.{name}")


def progress(rank: int, transient: bool = False) -> Progress:
    """A progress bar with ETA; a no-op display on ranks other than 0 and when not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=transient,
        disable=rank != 0 or not sys.stderr.isatty(),
    )


def print_table(rank: int, table: Table, min_width: int = 100) -> None:
    """Tables go to stdout on rank 0, so they can be captured separately from the log."""
    if rank == 0:
        Console(width=max(min_width, Console().width)).print(table)
