"""A two-host cluster on this machine, for tests that launch over ssh as a user's cluster does.

Each host is a network namespace (bench/hosts.py: a veth pair, the same interface name on both
ends) with its own hostname (a UTS namespace), its own /etc/hosts naming both nodes (ip netns
mounts /etc/netns/<ns>/hosts over /etc/hosts inside the namespace) and an sshd listening on the
host's address only, with a host key and a login key made for the test. The filesystem is shared,
as a cluster's run directory and venv are. ssh finds the test key through a wrapper put first on
PATH (`ssh -F <config>`), which is what a user's ~/.ssh/config does on a real cluster; nothing
outside the namespaces and the test's directory is touched.

`on(host, argv)` runs a command on a host (nsenter into its sshd's namespaces), the way a user's
shell on that node would; `close()` kills everything left in either namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import hosts  # noqa: E402

NODES = ("bp1node0", "bp1node1")
PACKAGES = {"sshd": "/usr/sbin/sshd", "ssh": "/usr/bin/ssh", "ssh-keygen": "/usr/bin/ssh-keygen",
            "pdsh": "/usr/bin/pdsh", "nsenter": "/usr/bin/nsenter", "unshare": "/usr/bin/unshare"}

SSHD_CONFIG = """\
ListenAddress {addr}
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {dir}/sshd{host}.pid
"""

SSH_CONFIG = """\
Host {nodes}
  User root
  IdentityFile {dir}/login_key
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 10
"""


def unavailable() -> str | None:
    """None when the cluster can be made here, else why not (what to install)."""
    reason = hosts.available()
    if reason:
        return reason
    missing = [name for name, path in PACKAGES.items() if not os.access(path, os.X_OK)]
    if missing:
        return (f"{', '.join(missing)} not installed "
                "(Debian: apt-get install openssh-server openssh-client pdsh util-linux)")
    return None


class TwoHosts:
    """Two ssh-reachable hosts, `bp1node0` and `bp1node1`, one slot each by default."""

    def __init__(self, workdir: Path, rate: str | None = None, slots: int = 1):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sshd: list[subprocess.Popen] = []
        hosts.make_hosts(rate)
        try:
            self._names()
            self._keys()
            self._start_sshd()
        except BaseException:
            self.close()
            raise
        self.hostfile = self.dir / "hostfile"
        self.hostfile.write_text("".join(f"{node} slots={slots}\n" for node in NODES))

    def _names(self) -> None:
        lines = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(hosts.ADDR, NODES))
        for ns in hosts.NS:
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(lines)

    def _keys(self) -> None:
        for name in ("host_key", "login_key"):
            for old in (self.dir / name, self.dir / f"{name}.pub"):  # ssh-keygen would ask before overwriting
                old.unlink(missing_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        shutil.copy(self.dir / "login_key.pub", self.dir / "authorized_keys")
        (self.dir / "ssh_config").write_text(SSH_CONFIG.format(nodes=" ".join(NODES), dir=self.dir))
        bin_dir = self.dir / "bin"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {self.dir}/ssh_config "$@"\n')
        wrapper.chmod(0o755)

    def _start_sshd(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        for host, (ns, node, addr) in enumerate(zip(hosts.NS, NODES, hosts.ADDR)):
            conf = self.dir / f"sshd{host}.conf"
            conf.write_text(SSHD_CONFIG.format(addr=addr, dir=self.dir, host=host))
            # -D: sshd stays in the foreground, so its pid is the handle on the host's namespaces
            self.sshd.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                 f'hostname {node} && exec /usr/sbin/sshd -D -f {conf} -E {self.dir}/sshd{host}.log']))
        deadline = time.time() + 20
        for proc in self.sshd:  # namespaces are entered through sshd's pid: wait until it is sshd
            while not os.path.realpath(f"/proc/{proc.pid}/exe").endswith("sshd"):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"sshd did not start: {(self.dir / 'sshd0.log').read_text()}")
                time.sleep(0.05)
        for node in NODES:
            while self.on(0, ["ssh", node, "true"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).wait(timeout=30) != 0:
                if time.time() > deadline:
                    raise RuntimeError(f"sshd on {node} did not answer: {(self.dir / 'sshd0.log').read_text()}")
                time.sleep(0.2)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a user's shell on a node: ssh that knows the test key first on PATH."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_"))}
        env["PATH"] = f"{self.dir / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(extra)
        return env

    def on(self, host: int, argv: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
        """Start `argv` on host `host` (its network, hostname and /etc/hosts)."""
        target = str(self.sshd[host].pid)
        cwd = str(popen.pop("cwd", None) or os.getcwd())  # entering a mount namespace starts at /
        return subprocess.Popen(["nsenter", "-t", target, "-n", "-u", "-m", f"--wd={cwd}", *argv],
                                env=env if env is not None else self.env(), **popen)

    def ranks(self, host: int) -> list[int]:
        """Pids of `python -m pipeline` processes running on host `host`."""
        pids = subprocess.run(["ip", "netns", "pids", hosts.NS[host]], capture_output=True, text=True).stdout
        found = []
        for pid in pids.split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-m" in argv and argv.index(b"-m") + 1 < len(argv) and argv[argv.index(b"-m") + 1] == b"pipeline":
                found.append(int(pid))
        return found

    def leftovers(self) -> list[str]:
        """Processes still in either namespace, other than the sshds (what a finished launch must not leave)."""
        keep = {str(p.pid) for p in self.sshd}
        left = []
        for ns in hosts.NS:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                if pid in keep:
                    continue
                try:
                    left.append(f"{ns}:{pid}:{Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
                except OSError:
                    pass
        return left

    def close(self) -> None:
        for ns in hosts.NS:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for proc in self.sshd:
            proc.wait(timeout=10)
        hosts.drop_hosts()
        for ns in hosts.NS:
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
