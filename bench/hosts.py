"""Two "hosts" on this machine: network namespaces joined by a veth pair, optionally rate-limited.

Used by the 1-bit benchmarks and the link test. Traffic goes only between the two namespaces'
own addresses. Bytes are read from the veth interfaces' kernel counters, so what is reported is
what crossed the link (headers included), not what the code believes it sent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

NS = ("bp1host0", "bp1host1")
# Both ends carry the same name inside their namespace, as the NICs of a real cluster's nodes do, so
# one GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME fits every host (a launcher exports one value to all).
IFACE = "bp1eth0"
DEV = (IFACE, IFACE)
ADDR = ("10.231.7.1", "10.231.7.2")
_PEERS = ("bp1veth0", "bp1veth1")  # the pair's names before each end is moved and renamed


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def available() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian iproute2)"
    return None


def make_hosts(rate: str | None = None) -> None:
    """Two namespaces, one veth pair; `rate` (e.g. "1gbit") shapes each direction with a token bucket."""
    drop_hosts()
    for ns in NS:
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", _PEERS[0], "type", "veth", "peer", "name", _PEERS[1])
    for ns, peer, dev, addr in zip(NS, _PEERS, DEV, ADDR):
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", peer, "name", dev)
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        if rate:  # tbf: a token-bucket rate limit (netem is not available on every kernel)
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
               "burst", "1mb", "latency", "100ms")


def drop_hosts() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def tx_bytes(host: int) -> int:
    """Bytes host `host` has sent over its veth since the pair was made."""
    return int(sh("ip", "netns", "exec", NS[host], "cat", f"/sys/class/net/{DEV[host]}/statistics/tx_bytes"))


def link_bytes() -> int:
    """Bytes sent over the link, both directions."""
    return tx_bytes(0) + tx_bytes(1)


def in_host(host: int, cmd: list[str], env: dict[str, str], cwd: Path, **popen) -> subprocess.Popen:
    """Start `cmd` inside host `host`, with gloo bound to its veth."""
    env = {**env, "GLOO_SOCKET_IFNAME": DEV[host], "NCCL_SOCKET_IFNAME": DEV[host]}
    return subprocess.Popen(["ip", "netns", "exec", NS[host], *cmd], env=env, cwd=cwd, **popen)
