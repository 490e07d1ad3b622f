"""What ran where: one JSON line per command in `<run>/commands.jsonl`, written by rank 0 at start."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

from pipeline.rundir import now_iso

COMMANDS = "commands.jsonl"
PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "pydantic")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def hardware() -> dict:
    import torch

    info = {"host": socket.gethostname(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus_per_node"] = torch.cuda.device_count()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(argv: list[str]) -> str:
    """`python -m pipeline ...` as the user would type it; the launcher's --local_rank is dropped."""
    args = [a for a in argv[1:] if not a.startswith("--local_rank")]
    return " ".join(["python -m pipeline", *args])


def record_command(run_dir: Path, argv: list[str], world_size: int, launcher: str) -> None:
    """Append this command to the run's log (rank 0 only; the run directory may not exist yet)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    entry = {"at": now_iso(), "command": command_line(argv), "world_size": world_size, "launcher": launcher,
             "versions": versions(), "hardware": hardware(), "python": sys.executable}
    with open(run_dir / COMMANDS, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """One object per line; a line cut short (a kill or a full disk mid-write) is skipped, the rest counts."""
    if not Path(path).exists():
        return []
    entries = []
    for line in Path(path).read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def read_commands(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / COMMANDS)
