"""Launch environment and process group: the only module that reads launcher or MPI variables.

Every launcher describes the job differently:
  deepspeed   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK, MASTER_ADDR/PORT (+ --local_rank)
  torchrun    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT
  Open MPI    OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE, OMPI_COMM_WORLD_NODE_RANK
  MPICH       PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
  none        a single process
`detect` turns any of them into one `LaunchEnv`; `Dist` then writes the torch.distributed
variables (so DeepSpeed and torch see the same thing under every launcher) and owns the
process group used for coordination.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import torch
import torch.distributed as tdist

from pipeline.errors import ConfigError, PipelineError


class LaunchError(PipelineError):
    """This rank cannot join the group: the launch's network settings, not the code."""


def join_failure(env: LaunchEnv, backend: str, reason: str, environ: Mapping[str, str]) -> str:
    """One line for a failed rendezvous: which rank, where, the interface setting and what this host has."""
    setting = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    interfaces = ", ".join(f"{name} {addrs[0]}" for name, addrs in local_interfaces().items()) or "none"
    first = next((line.strip() for line in reason.splitlines() if line.strip()), reason)
    return (f"rank {env.rank} on {socket.gethostname()} cannot join the {backend} group at "
            f"{env.master_addr}:{env.master_port}: {first}. {setting}={environ.get(setting, '(unset)')}; "
            f"this host's interfaces: {interfaces}. Set {setting} to the one that joins the nodes")


def local_interfaces() -> dict[str, list[str]]:
    """IPv4 addresses per network interface of this host."""
    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items() if any(a.family == socket.AF_INET for a in addrs)}


Launcher = Literal["deepspeed", "torchrun", "openmpi", "mpich", "single"]
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str | None  # None: only MPI can tell (multi-node mpirun); resolved by Dist
    master_port: int

    @property
    def single_node(self) -> bool:
        return self.local_world_size == self.world_size


def build_tools_path(path: str, executable: str) -> str:
    """PATH with this interpreter's bin directory first, when it has its own ninja.

    DeepSpeed builds its CPU ops (the shm all-reduce) on first use with whichever ninja PATH finds. A
    rank started from a bare ssh shell (pdsh, mpirun on another host) finds the system's ninja, the
    local ranks the venv's; two ninja versions do not read each other's build log, so each launch
    would rebuild the op in the shared extensions cache (a minute of compiling per launch)."""
    bindir = os.path.dirname(executable)
    if not os.path.isfile(os.path.join(bindir, "ninja")):
        return path
    rest = [entry for entry in path.split(os.pathsep) if entry and entry != bindir]
    return os.pathsep.join([bindir, *rest])


def detect(environ: Mapping[str, str]) -> LaunchEnv:
    """Normalise the launcher's variables; pure, so each launcher's env can be tested."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_torch_style(environ)
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _from_mpi(environ, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                         "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    if "PMI_RANK" in environ:
        return _from_mpi(environ, "mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    # Port 0: any free one, picked when the process group (or DeepSpeed) needs a store.
    return LaunchEnv("single", 0, 1, 0, 1, 0, "127.0.0.1", _int(environ, "MASTER_PORT", 0))


def _from_torch_style(environ: Mapping[str, str]) -> LaunchEnv:
    torchrun = "TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ
    world = _int(environ, "WORLD_SIZE")
    local_world = _int(environ, "LOCAL_WORLD_SIZE" if torchrun else "LOCAL_SIZE", world)
    node_rank = _int(environ, "GROUP_RANK" if torchrun else "CROSS_RANK", 0)
    return _checked(LaunchEnv(
        launcher="torchrun" if torchrun else "deepspeed",
        rank=_int(environ, "RANK"),
        world_size=world,
        local_rank=_int(environ, "LOCAL_RANK", 0),
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", DEFAULT_PORT),
    ))


def _from_mpi(environ: Mapping[str, str], launcher: Launcher, rank_key: str, size_key: str,
              local_rank_key: str, local_size_key: str) -> LaunchEnv:
    world = _int(environ, size_key)
    local_world = _int(environ, local_size_key, 1)
    rank = _int(environ, rank_key)
    # Ranks fill nodes in blocks under both MPIs' default mapping; Open MPI says so directly.
    node_rank = _int(environ, "OMPI_COMM_WORLD_NODE_RANK", rank // max(local_world, 1))
    addr = environ.get("MASTER_ADDR") or ("127.0.0.1" if local_world == world else None)
    return _checked(LaunchEnv(launcher, rank, world, _int(environ, local_rank_key, 0), local_world,
                              node_rank, addr, _int(environ, "MASTER_PORT", DEFAULT_PORT)))


def _checked(env: LaunchEnv) -> LaunchEnv:
    if not 0 <= env.rank < env.world_size or not 0 <= env.local_rank < env.local_world_size:
        raise ValueError(f"inconsistent launch environment from {env.launcher}: {env}")
    return env


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"launch environment lacks {key}")
        return default
    return int(value)


def _mpi_master_addr(env: LaunchEnv) -> str:
    """Multi-node mpirun names no rendezvous host: ask rank 0 for its address over MPI."""
    from mpi4py import MPI  # imported late: MPI_Init only under an MPI launcher

    addr = socket.gethostbyname(socket.gethostname()) if env.rank == 0 else None
    return MPI.COMM_WORLD.bcast(addr, root=0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dist:
    """The job's ranks and the process group used to coordinate them (barriers, objects)."""

    def __init__(self, env: LaunchEnv, timeout_minutes: int = 60, backend: str = "auto"):
        addr = env.master_addr or _mpi_master_addr(env)
        port = env.master_port or _free_port()
        self.env = LaunchEnv(**{**env.__dict__, "master_addr": addr, "master_port": port})
        self._timeout = dt.timedelta(minutes=timeout_minutes)
        self._backend = backend
        self.backend()  # a backend this machine cannot run is refused before any stage starts
        self.export_env()

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def export_env(self) -> None:
        """Write the torch.distributed variables so `init_process_group` and DeepSpeed agree."""
        env = self.env
        os.environ.update({
            "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
        })
        os.environ["PATH"] = build_tools_path(os.environ.get("PATH", ""), sys.executable)

    def backend(self) -> str:
        """The process group's backend per device type. The coordination tensors (stop agreement, metric
        sums, LAMB's norms over partitions, object collectives) live on the CPU, and NCCL moves CUDA tensors
        only, so `nccl` means NCCL for CUDA tensors with gloo beside it for the CPU ones."""
        gpus = torch.cuda.is_available()
        if self._backend == "nccl" and not gpus:
            raise ConfigError("distributed.backend: nccl needs CUDA GPUs, and this machine has none "
                              "(auto picks gloo here)")
        if self._backend == "gloo":
            return "gloo"
        return "cpu:gloo,cuda:nccl" if gpus else "gloo"

    def init_process_group(self) -> None:
        """Join the group (idempotent). A single process needs none, so it starts no store."""
        if self.world_size == 1 or tdist.is_initialized():
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(self.env.local_rank)
        try:
            tdist.init_process_group(backend=self.backend(), init_method="env://", rank=self.rank,
                                     world_size=self.world_size, timeout=self._timeout)
        except RuntimeError as exc:  # the backend's traceback says nothing about which setting is wrong
            raise LaunchError(join_failure(self.env, self.backend(), str(exc), os.environ)) from None

    def barrier(self) -> None:
        if self.world_size > 1:
            self.init_process_group()
            tdist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        self.init_process_group()
        gathered: list[Any] = [None] * self.world_size
        tdist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        self.init_process_group()
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def shutdown(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()


PEER_GONE = re.compile(r"connection (closed|reset) by peer|broken pipe|socket timeout|timed out|"
                       r"communicator was aborted|watchdog", re.IGNORECASE)


def lost_peer(exc: BaseException) -> str | None:
    """What a backend error says about a rank that went away, in one line; None for other errors."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not PEER_GONE.search(text):  # DistBackendError is a RuntimeError
        return None
    peer = re.search(r"\[([0-9A-Za-z.:-]+)\]:(\d+)", text)
    where = f" (peer {peer[1]}:{peer[2]})" if peer else ""
    first = PEER_GONE.search(text)[0]
    return f"lost a rank: {first.lower()}{where}"
