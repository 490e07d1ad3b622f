"""supervise.py COMMAND...: run a launcher (deepspeed) so that a stop signal reaches every rank and
nothing outlives it.

DeepSpeed's runner does not forward signals on one node (its child launcher and the ranks keep
running when it is killed), its launcher forwards only SIGINT/SIGTERM and SIGKILLs ranks 30 s
later, and SIGUSR1 (Slurm's early warning) kills both outright. So this wrapper starts the launcher
in its own session and, on SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP, sends the signal to the ranks
themselves (the `python -m pipeline` processes of the session): they finish the step, save and exit
with code 75, and the launcher follows. If the session is still alive after PIPELINE_STOP_GRACE_S
seconds (default 600) it is killed; when the launcher exits, whatever is left of the session is
killed too. The exit code is the launcher's.

Ranks that are not the launcher's children (a multi-node launch: pdsh or mpirun start every rank,
the first host's too, from a remote shell) are reached through a stop file instead: for a stage
command this wrapper names a file in the run directory (shared storage) in PIPELINE_STOP_FILE, which
every rank gets in its environment, and creates it on a stop signal; each rank looks for it once a
step (pipeline/stopping.py), and their all-reduce makes every rank stop after the same step.

If this wrapper itself dies without cleaning up (kill -9, the OOM killer), a watchdog in a session
of its own sees its pipe close and stops the launch as a signal would (stop file, SIGTERM to the
ranks, the launcher's session killed after the grace period), so no process outlives the command.

Ranks on other hosts start from a bare ssh shell. What they need from this one (the accelerator,
the network interface, the extensions cache, ...) goes through DeepSpeed's own mechanism: an env
file of KEY=VALUE lines that its multi-node runner exports on every host before it starts a rank.
This wrapper writes that file (the forwarded variables set here, after the lines of the user's
~/.deepspeed_env and ./.deepspeed_env, which DeepSpeed would otherwise read), points DS_ENV_FILE
at it for the launcher, and removes it at exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

NO_RANKS_WAIT_S = 5.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
# what every rank needs to see as the launching shell does; PYTHON* DeepSpeed exports by itself.
# PIPELINE_FORWARD_ENV="NAME ..." adds more.
EXPORTED = ("DS_ACCELERATOR", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG",
            "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE",
            "TOKENIZERS_PARALLELISM", "PIPELINE_STOP_GRACE_S", "PIPELINE_STOP_FILE")


def env_file_lines(environ: dict[str, str], user_files: list[Path]) -> list[str]:
    """The DeepSpeed env file: the user's own files first, then the forwarded variables set here."""
    lines = []
    for path in user_files:
        if path.is_file():
            lines += [line.strip() for line in path.read_text().splitlines() if "=" in line]
    names = [*EXPORTED, *environ.get("PIPELINE_FORWARD_ENV", "").split()]
    lines += [f"{name}={environ[name]}" for name in dict.fromkeys(names) if environ.get(name)]
    return lines


def write_env_file(environ: dict[str, str]) -> Path:
    user = [Path.home() / ".deepspeed_env", Path.cwd() / ".deepspeed_env"]
    handle, name = tempfile.mkstemp(prefix="pipeline-deepspeed-env.")
    with os.fdopen(handle, "w") as out:
        out.write("".join(line + "\n" for line in env_file_lines(environ, user)))
    return Path(name)


def ranks_of(pid: int) -> list[psutil.Process]:
    ranks = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1] == "pipeline":
            ranks.append(child)
    return ranks


def kill_session(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_file_for(command: list[str]) -> Path | None:
    """A file in the run directory of the stage command's config, unique to this launch; None for commands
    without a run (env) or a config that does not load (the stage itself says why)."""
    if "--config" not in command or command.index("--config") + 1 >= len(command):
        return None
    config = command[command.index("--config") + 1]
    overrides = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "--set"]
    try:
        from pipeline.config import load_config
        from pipeline.errors import PipelineError

        cfg = load_config(config, overrides)
    except (ImportError, PipelineError):
        return None
    return (cfg.run.root / cfg.run.name).resolve() / f".stop-{socket.gethostname()}-{os.getpid()}"


def request_stop(stop_file: Path | None) -> None:
    if stop_file is not None:
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()


def signal_ranks(launcher_pid: int, signum: int) -> list[psutil.Process]:
    ranks = ranks_of(launcher_pid)
    for rank in ranks:
        try:
            rank.send_signal(signum)
        except psutil.Error:
            pass
    return ranks


def main(command: list[str]) -> int:
    stop_file = stop_file_for(command)
    if stop_file is not None:
        os.environ["PIPELINE_STOP_FILE"] = str(stop_file)  # every rank's env: the env file carries it
    env_file = write_env_file(dict(os.environ))
    try:
        return supervise(command, {**os.environ, "DS_ENV_FILE": str(env_file)}, stop_file)
    finally:
        env_file.unlink(missing_ok=True)
        if stop_file is not None:
            stop_file.unlink(missing_ok=True)


def supervise(command: list[str], env: dict[str, str], stop_file: Path | None = None) -> int:
    launcher = subprocess.Popen(command, start_new_session=True, env=env)
    grace = float(os.environ.get("PIPELINE_STOP_GRACE_S", 600))
    watchdog = subprocess.Popen([sys.executable, __file__, "--watchdog", str(launcher.pid), str(stop_file or ""),
                                 str(grace)], stdin=subprocess.PIPE, start_new_session=True)
    timers: list[threading.Timer] = []

    def forward(signum: int, frame) -> None:
        request_stop(stop_file)
        ranks = signal_ranks(launcher.pid, signum)
        if not timers:
            # no rank seen and no stop file to find: none has started yet (the launcher is stopped after a short
            # wait), or all have just finished and the launcher is exiting with their code (it must not be
            # killed: a job scheduler's warning that lands then would turn a complete stage into a failed command)
            delay = grace if ranks or stop_file is not None else min(grace, NO_RANKS_WAIT_S)
            timers.append(threading.Timer(delay, kill_session, (launcher.pid,)))
            timers[0].daemon = True
            timers[0].start()

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = launcher.wait()
    kill_session(launcher.pid)  # no orphans: ranks, loaders, anything the launcher left
    watchdog.communicate(b"done\n")
    code = code if code >= 0 else 128 - code
    return ranks_code(stop_file) if code == 0 and stop_file is not None else code


def ranks_code(stop_file: Path) -> int:
    """What the ranks exited with, as launch/rank.py recorded it (DeepSpeed's MPI helper exits 0 whatever the
    rank did): 0 if none recorded or all 0; else a failure's code before a stop's (75)."""
    codes = []
    for path in stop_file.parent.glob(f"{stop_file.name}.exit-rank*"):
        try:
            codes.append(int(path.read_text()))
        except (OSError, ValueError):
            codes.append(1)
        path.unlink(missing_ok=True)
    failed = [c for c in codes if c not in (0, 75)]
    return failed[0] if failed else max(codes, default=0)


def watch(launcher_pid: int, stop_file: Path | None, grace: float) -> int:
    """The watchdog: wait for the supervising command's pipe to close; if it closed without "done", the
    command died: stop the launch the way a stop signal does."""
    if sys.stdin.buffer.read().strip() == b"done":
        return 0
    request_stop(stop_file)
    signal_ranks(launcher_pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(launcher_pid):
        time.sleep(0.5)
    kill_session(launcher_pid)
    if stop_file is not None:
        stop_file.unlink(missing_ok=True)
    return 0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    if sys.argv[1:2] == ["--watchdog"]:
        sys.exit(watch(int(sys.argv[2]), Path(sys.argv[3]) if sys.argv[3] else None, float(sys.argv[4])))
    sys.exit(main(sys.argv[1:]))
