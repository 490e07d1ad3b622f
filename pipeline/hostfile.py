"""Hostfiles (`hostfiles/*`): one line per node, `name slots=N`, as the deepspeed launcher reads them.

Checked before anything launches, so that a bad file is one line naming the file, the line and the
reason (exit 2), not a launcher traceback or a silent single-process run.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import ConfigError

LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots=(?P<slots>\S+)$")


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """(host, slots) per node, in file order."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"hostfile {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"hostfile {path}: cannot be read ({exc})") from None
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = LINE.match(line)
        if match is None:
            raise ConfigError(f"hostfile {path}, line {number}: '{line}' is not 'HOSTNAME slots=N'")
        host, slots = match["host"], match["slots"]
        if not slots.isdigit() or int(slots) < 1:
            raise ConfigError(f"hostfile {path}, line {number}: slots={slots} is not a positive whole number")
        if host in hosts:
            raise ConfigError(f"hostfile {path}, line {number}: {host} is listed twice")
        hosts[host] = int(slots)
    if not hosts:
        raise ConfigError(f"hostfile {path}: names no host (every line is empty or a comment)")
    return list(hosts.items())
