"""One stage (or run-all) inside a Slurm job, carried across time-limited jobs by requeueing.

    sbatch launch/slurm/<stage>.sbatch CONFIG [section.field=value ...]

What the job does, from the repository root on the shared filesystem (SLURM_SUBMIT_DIR):
- writes a hostfile from the allocation (`scontrol show hostnames`), with SLOTS_PER_NODE slots
  per node (default: the node's GPUs, else --ntasks-per-node, else 1); prepare gets one slot
  per node (each rank runs a process pool of its own);
- names the first node as the rendezvous, on a port taken from the job id, so two jobs sharing
  a node do not collide;
- starts the stage through the same scripts as by hand (launch/run_stage.sh, prepare_mpi.sh),
  with a deadline at the job's end time less PIPELINE_DEADLINE_MARGIN_S (default 60 s), in case
  the warning signal comes late;
- passes the warning signal (`#SBATCH --signal=B:USR1@N`; also the SIGTERM of a preemption or of
  the time limit) on to the stage: every rank finishes its step, saves a checkpoint, exits 75;
- on 75 requeues itself (`scontrol requeue`): the next job of the chain resumes from that
  checkpoint; on 0 the stage is complete and the chain ends; anything else ends it as failed.

Written in Python rather than in the sbatch script because bash runs a trap only after its
foreground child exits, and the signal must reach the stage while it runs.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOPPED = 75  # the stage saved and stopped (signal or deadline); the same command resumes
SINGLE_PROCESS = ("prune", "report")


def log(message: str) -> None:
    print(f"[slurm job {os.environ.get('SLURM_JOB_ID', '?')} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True).stdout


def allocation_hosts(env: dict[str, str]) -> list[str]:
    return scontrol("show", "hostnames", env["SLURM_JOB_NODELIST"]).split()


def slots_per_node(env: dict[str, str]) -> int:
    for name in ("SLOTS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def seconds_left(job: str) -> float | None:
    """Seconds until the job's time limit (EndTime in `scontrol show job`), or None if it has none."""
    match = re.search(r"\bEndTime=(\S+)", scontrol("show", "job", job))
    try:
        return dt.datetime.fromisoformat(match[1]).timestamp() - time.time() if match else None
    except ValueError:  # Unknown / None: no time limit
        return None


def stage_command(stage: str, config: str, hosts: list[str], slots: int, hostfile: Path,
                  sets: list[str]) -> list[str]:
    if stage == "prepare":  # mpirun, one rank per node
        hostfile.write_text("".join(f"{host} slots=1\n" for host in hosts))
        return ["bash", "launch/prepare_mpi.sh", config, str(len(hosts)), str(hostfile), *sets]
    hostfile.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
    where = "" if stage in SINGLE_PROCESS else str(hostfile)
    return ["bash", "launch/run_stage.sh", stage, config, where, *sets]


def run(stage: str, config: str, sets: list[str]) -> int:
    env = os.environ
    job = env["SLURM_JOB_ID"]
    hosts, slots = allocation_hosts(env), slots_per_node(env)
    left = seconds_left(job)
    if left is not None and stage != "prepare":  # prepare's units resume; it has no deadline setting
        margin = float(env.get("PIPELINE_DEADLINE_MARGIN_S", 60))
        sets = [*sets, f"run.deadline={max(int(left), 1)}s", f"run.deadline_margin_minutes={margin / 60:.4f}"]
    log(f"{stage} {config}: start {int(env.get('SLURM_RESTART_COUNT', 0)) + 1} of the chain, "
        f"{len(hosts)} node(s) x {slots} slot(s) on {','.join(hosts)}, "
        + (f"{left:.0f} s left" if left is not None else "no time limit"))
    child_env = {**env, "MASTER_ADDR": hosts[0], "MASTER_PORT": str(29500 + int(job) % 1000)}
    with tempfile.TemporaryDirectory(prefix=f"pipeline-slurm-{job}.") as tmp:
        command = stage_command(stage, config, hosts, slots, Path(tmp) / "hostfile", sets)
        proc = subprocess.Popen(command, env=child_env)

        signalled = []

        def forward(signum: int, frame) -> None:
            log(f"{signal.Signals(signum).name}: the stage saves and stops")
            signalled.append(signum)
            if proc.poll() is None:
                proc.send_signal(signum)

        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        code = proc.wait()
    if code == 0:
        log(f"{stage} complete")
        return 0
    if code != STOPPED and not signalled:
        log(f"{stage} failed (exit {code}); not requeued: fix the cause, then sbatch the same line again")
        return code
    if code == STOPPED:
        log(f"{stage} stopped at a checkpoint; requeueing job {job}")
    else:  # the signal came before the stage could take it (start-up): the next job finds out where it is
        log(f"{stage} ended with exit {code} after the stop signal; requeueing job {job} (a complete stage ends "
            "the chain there)")
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if requeue.returncode:
        log(f"scontrol requeue {job} failed ({requeue.stderr.strip()}): submit the same line again to resume")
    return STOPPED


def main(argv: list[str]) -> int:
    if len(argv) < 2 or "SLURM_JOB_ID" not in os.environ:
        print("usage: sbatch launch/slurm/<stage>.sbatch CONFIG [section.field=value ...] "
              "(job.py runs inside a Slurm job)", file=sys.stderr)
        return 2
    os.chdir(os.environ.get("PIPELINE_ROOT") or os.environ.get("SLURM_SUBMIT_DIR") or ".")
    return run(argv[0], argv[1], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
