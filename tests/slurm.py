"""A one-node Slurm on this machine, for tests that submit jobs as a user of a cluster does.

munged (its own key and socket) and slurmctld + slurmd from Debian's slurm-wlm, configured in the
test's directory (SLURM_CONF points the client commands at it): one node with this machine's
CPUs, one partition whose time limit is a few minutes. The requeue wait (AuthInfo cred_expire,
120 s by default) is cut to 10 s so a chain of jobs fits a test. `close()` cancels what is left,
stops the daemons, and kills any process they left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

BINARIES = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/bin/scontrol",
            "/usr/bin/squeue")

CONF = """\
ClusterName=pipelinetest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket,cred_expire=10
SlurmctldPort={port}
SlurmdPort={port1}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/linear
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=short Nodes={host} Default=YES MaxTime={max_minutes} State=UP
"""


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (munged and slurmd run as root here)"
    missing = [path for path in BINARIES if not os.access(path, os.X_OK)]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge)"
    return None


class OneNodeSlurm:
    def __init__(self, workdir: Path, max_minutes: int = 3):
        self.dir = Path(workdir)
        self.host = socket.gethostname()
        self.daemons: list[subprocess.Popen] = []
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "slurm.conf"
        self.conf.write_text(CONF.format(host=self.host, dir=self.dir, port=16817, port1=16818, cpus=os.cpu_count(),
                                         max_minutes=max_minutes))
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**env, "SLURM_CONF": str(self.conf), **extra}

    def _start(self) -> None:
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge = ["/usr/sbin/munged", "-F", "--force", f"--key-file={key}", f"--socket={self.dir}/munge.socket",
                 f"--pid-file={self.dir}/munged.pid", f"--log-file={self.dir}/munged.log",
                 f"--seed-file={self.dir}/munged.seed"]
        self._daemon(munge, self.dir / "munge.socket")
        self._daemon(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)], None)
        self._daemon(["/usr/sbin/slurmd", "-D", "-f", str(self.conf)], None)
        deadline = time.time() + 60
        while "idle" not in self.run("sinfo", "-h", "-o", "%t").stdout:
            if time.time() > deadline:
                raise RuntimeError(f"the node did not come up: {self.run('sinfo').stdout}"
                                   f"{(self.dir / 'slurmctld.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def _daemon(self, argv: list[str], ready: Path | None) -> None:
        proc = subprocess.Popen(argv, env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.daemons.append(proc)
        deadline = time.time() + 20
        while ready is not None and not ready.exists():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{argv[0]} did not start")
            time.sleep(0.1)

    def run(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, check=check)

    def sbatch(self, *argv: str, cwd: Path) -> str:
        out = subprocess.run(["sbatch", "--parsable", *argv], env=self.env(), cwd=cwd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        """JobState and Restarts of a job from slurmctld (kept MinJobAge after it ends)."""
        text = self.run("scontrol", "show", "job", job).stdout
        fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
        return f"{fields.get('JobState', '?')} restarts={fields.get('Restarts', '?')}"

    def close(self) -> None:
        if self.daemons:
            self.run("scancel", "--full", "--user=root")
            time.sleep(1)
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        # what jobs started outlives a daemon killed mid-job: nothing of the test stays behind
        for proc in psutil.process_iter(["environ"]):
            try:
                if (proc.info["environ"] or {}).get("SLURM_CONF") == str(self.conf):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(self.dir / "spool", ignore_errors=True)
