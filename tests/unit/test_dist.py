"""Every launcher's variables normalise to the same LaunchEnv."""

from __future__ import annotations

import pytest

from pipeline import dist
from pipeline.dist import LaunchEnv, detect


def test_single_process():
    env = detect({})
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == ("single", 0, 1, "127.0.0.1")


def test_deepspeed_launcher():
    env = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
                  "CROSS_SIZE": "2", "MASTER_ADDR": "node01", "MASTER_PORT": "29600"})
    assert env == LaunchEnv("deepspeed", 5, 8, 1, 4, 1, "node01", 29600)
    assert not env.single_node


def test_torchrun():
    env = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert env == LaunchEnv("torchrun", 3, 4, 1, 2, 1, "10.0.0.1", 1234)


def test_openmpi_single_node_rendezvous_on_loopback():
    env = detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert env == LaunchEnv("openmpi", 1, 2, 1, 2, 0, "127.0.0.1", 29500)
    assert env.single_node


def test_openmpi_multi_node_leaves_address_to_mpi():
    env = detect({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1"})
    assert env.master_addr is None and env.node_rank == 1 and env.rank == 6


def test_mpich_hydra():
    env = detect({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
                  "MASTER_ADDR": "head", "MASTER_PORT": "29555"})
    assert env == LaunchEnv("mpich", 2, 4, 0, 2, 1, "head", 29555)


def test_torch_style_variables_win_over_mpi():
    # mpirun starting torchrun-style ranks that already set RANK: trust the explicit variables
    env = detect({"RANK": "0", "WORLD_SIZE": "1", "PMI_RANK": "0", "PMI_SIZE": "1"})
    assert env.launcher == "deepspeed" and env.world_size == 1


@pytest.mark.parametrize("bad", [{"RANK": "2", "WORLD_SIZE": "2"},
                                 {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "3"}])
def test_inconsistent_env_is_refused(bad):
    with pytest.raises(ValueError):
        detect(bad)


def test_a_failed_rendezvous_names_the_rank_the_setting_and_the_interfaces_there():
    from pipeline.dist import LaunchEnv, join_failure

    env = LaunchEnv("deepspeed", 3, 4, 1, 2, 1, "node01", 29500)
    line = join_failure(env, "nccl", "RuntimeError: connect timed out\n  more detail", {"NCCL_SOCKET_IFNAME": "ib9"})
    assert "\n" not in line and line.startswith("rank 3 on ")
    assert "the nccl group at node01:29500: RuntimeError: connect timed out." in line
    assert "NCCL_SOCKET_IFNAME=ib9" in line and "lo 127.0.0.1" in line
    assert "GLOO_SOCKET_IFNAME=(unset)" in join_failure(env, "gloo", "x", {})


def test_nccl_chosen_by_hand_keeps_cpu_tensors_on_gloo(monkeypatch):
    """The stop agreement, metric sums and LAMB's partition norms are CPU tensors, which NCCL cannot move."""
    import torch

    from pipeline.dist import Dist

    env = LaunchEnv("deepspeed", 0, 2, 0, 2, 0, "127.0.0.1", 29999)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Dist(env, backend="nccl").backend() == "cpu:gloo,cuda:nccl"
    assert Dist(env, backend="auto").backend() == "cpu:gloo,cuda:nccl"
    assert Dist(env, backend="gloo").backend() == "gloo"


def test_nccl_without_gpus_is_one_line_naming_the_field(monkeypatch, tmp_path):
    import torch

    from pipeline.dist import Dist
    from pipeline.errors import ConfigError
    from tests.conftest import run_cli, write_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = LaunchEnv("deepspeed", 0, 2, 0, 2, 0, "127.0.0.1", 29999)
    with pytest.raises(ConfigError, match="distributed.backend: nccl needs CUDA GPUs"):
        Dist(env, backend="nccl")
    config = write_config(tmp_path / "c.yaml", {"run": {"name": "x", "root": str(tmp_path)},
                                                 "distributed": {"backend": "nccl"}})
    proc = run_cli("pretrain", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: distributed.backend: nccl needs CUDA GPUs, and this machine has none (auto picks gloo "
                     "here)"], proc.stderr


def test_ranks_build_ops_with_the_ninja_beside_their_interpreter(tmp_path):
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    python = str(bindir / "python")
    bare_ssh_path = "/usr/local/bin:/usr/bin:/bin"
    assert dist.build_tools_path(bare_ssh_path, python) == bare_ssh_path  # no ninja there: PATH unchanged
    (bindir / "ninja").write_text("")
    assert dist.build_tools_path(bare_ssh_path, python) == f"{bindir}:{bare_ssh_path}"
    assert dist.build_tools_path(f"/usr/bin:{bindir}", python) == f"{bindir}:/usr/bin"
