"""Two hosts over ssh: the deepspeed launcher's pdsh runner and MPICH's mpirun start the ranks, as
on a user's cluster. Each host is a network namespace with its own sshd (tests/twohost.py); the
filesystem is shared, as the run directory and the venv are on a cluster.

What crosses to the remote host is only what the launch scripts send: the tests set the variables
on the launching shell (the interface name, the accelerator), never on the remote side.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env, run_cli, write_config

twohost = pytest.importorskip("tests.twohost")

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
STEPS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = twohost.unavailable()
    if reason:
        pytest.skip(f"two-host cluster: {reason}")
    hosts = twohost.TwoHosts(tmp_path_factory.mktemp("twohost"))
    yield hosts
    left = hosts.leftovers()
    hosts.close()
    assert not left, f"processes left on the hosts: {left}"


def _launch_env(cluster, **extra: str) -> dict[str, str]:
    """The launching user's shell on bp1node0: only the interface name is chosen by hand."""
    env = cluster.env(GLOO_SOCKET_IFNAME=twohost.hosts.IFACE, TOKENIZERS_PARALLELISM="false",
                      PYTHONPATH=str(REPO), **extra)
    env.pop("DS_ACCELERATOR", None)  # the launch script decides it, and it must reach the remote rank
    return env


def _on_node0(cluster, argv: list[str], timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    proc = cluster.on(0, argv, env=_launch_env(cluster, **extra), cwd=REPO, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def _config(root: Path, name: str, **sections) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"run": {"name": name, "root": str(root / "runs")},
           "data": {"sources": [{"kind": "text", "paths": [str(REPO / ".cache/corpora/bbc/politics")],
                                 "doc_split": "file"}],
                    "tokenizer": {"kind": "train", "vocab_size": 2000}, "seq_lengths": [64],
                    "validation_fraction": 0.05, "unit_mb": 0.05, "workers": 1},
           "model": {"preset": "tiny", "max_position_embeddings": 64},
           "optimizer": {"name": "lamb", "lr": 3e-3},
           "schedule": {"warmup": 0.2},
           "pretrain": {"phases": [{"seq_len": 64, "steps": STEPS, "global_batch_size": 16, "micro_batch_size": 8}],
                        "precision": "fp32", "checkpoint_every": 4, "keep_last": 2, "eval_every": 6,
                        "eval_batches": 2, "log_every": 1},
           "distributed": {"ds_config": str(REPO / "ds_configs/pretrain_zero2_lamb.json")}}
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value}
    return write_config(root / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, cluster) -> Path:
    """The data, prepared across both hosts by mpirun over ssh."""
    root = tmp_path_factory.mktemp("runs2h")
    proc = _on_node0(cluster, ["bash", "launch/prepare_mpi.sh", str(_config(root, "data")), "2",
                               str(cluster.hostfile)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    return root


def _same_prepare(root: Path, name: str) -> Path:
    dst = root / "runs" / name / "prepare"
    if not dst.exists():
        shutil.copytree(root / "runs/data/prepare", dst)
    return dst


def test_env_reports_both_hosts_and_the_allreduce_works(cluster, tmp_path):
    """`deepspeed --hostfile` as launch/run_stage.sh runs it (the env file made by supervise.py)."""
    out = tmp_path / "ranks.json"
    proc = _on_node0(cluster, [str(REPO / ".venv/bin/python"), str(REPO / "launch/supervise.py"),
                               str(REPO / ".venv/bin/deepspeed"), "--hostfile", str(cluster.hostfile),
                               "--module", "pipeline", "env", "--json", str(out)], DS_ACCELERATOR="cpu")
    assert proc.returncode == 0, proc.stdout[-3000:]
    seen = json.loads(out.read_text())
    assert seen["allreduce_ok"]
    assert [(r["rank"], r["node_rank"], r["host"]) for r in seen["ranks"]] == [
        (0, 0, "bp1node0"), (1, 1, "bp1node1")]


def test_no_ssh_key_or_no_pdsh_is_one_line_before_anything_starts(cluster, tmp_path):
    bare = _on_node0(cluster, ["bash", "launch/run_stage.sh", "env", "", str(cluster.hostfile)],
                     PATH="/usr/local/bin:/usr/bin:/bin")  # ssh without the cluster's key
    assert bare.returncode == 2 and "Traceback" not in bare.stdout, bare.stdout[-2000:]
    assert f"error: hostfile {cluster.hostfile}: bp1node0 cannot ssh to bp1node0 without a password" in bare.stdout
    no_pdsh = tmp_path / "bin"
    no_pdsh.mkdir()
    for tool in ("bash", "awk", "ssh", "hostname", "tail", "dirname", "nsenter"):
        (no_pdsh / tool).symlink_to(cluster.dir / "bin/ssh" if tool == "ssh" else shutil.which(tool))
    proc = _on_node0(cluster, [shutil.which("bash"), "launch/run_stage.sh", "env", "", str(cluster.hostfile)],
                     PATH=str(no_pdsh))
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("error: pdsh is not installed on bp1node0")


def test_mpirun_over_ssh_puts_a_rank_on_each_host(cluster, tmp_path):
    out = tmp_path / "ranks.json"
    proc = _on_node0(cluster, [str(REPO / ".venv/bin/mpirun"), "-n", "2", "-hosts", "bp1node0:1,bp1node1:1",
                               str(REPO / ".venv/bin/python"), "-m", "pipeline", "env", "--json", str(out)],
                     DS_ACCELERATOR="cpu")
    assert proc.returncode == 0, proc.stdout[-3000:]
    seen = json.loads(out.read_text())
    assert seen["allreduce_ok"] and {r["launcher"] for r in seen["ranks"]} == {"mpich"}
    assert [r["host"] for r in seen["ranks"]] == ["bp1node0", "bp1node1"]


def _outputs(stage: Path) -> dict[str, bytes]:
    """The shards, the manifest and the tokenizer (not the records, which hold timings and paths)."""
    return {str(p.relative_to(stage)): p.read_bytes() for p in sorted(stage.rglob("*"))
            if p.is_file() and p.parts[len(stage.parts)] in ("shards", "tokenizer", "manifest.json")}


def test_prepare_across_hosts_writes_the_shards_of_a_one_host_run(cluster, tmp_path):
    # the fixed bert-base-uncased vocab: a vocab trained by `tokenizers` differs from run to run on
    # frequency ties (huggingface/tokenizers#1794), on one host as on two
    data = {"tokenizer": {"kind": "bert-base-uncased"}}
    two = _config(tmp_path / "two", "data", data=data)
    proc = _on_node0(cluster, ["bash", "launch/prepare_mpi.sh", str(two), "2", str(cluster.hostfile)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc = run_cli("prepare", "--config", str(_config(tmp_path / "one", "data", data=data)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "two/runs/data/prepare/stage.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    a, b = _outputs(tmp_path / "two/runs/data/prepare"), _outputs(tmp_path / "one/runs/data/prepare")
    assert any(name.startswith("shards/") for name in a) and a.keys() == b.keys()
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, differ


def _pretrain_two_hosts(cluster, config: Path, **extra: str) -> subprocess.CompletedProcess:
    return _on_node0(cluster, ["bash", "launch/run_stage.sh", "pretrain", str(config), str(cluster.hostfile)],
                     **extra)


def _pretrain_one_host(config: Path) -> None:
    proc = subprocess.run(["bash", "launch/run_stage.sh", "pretrain", str(config), "hostfiles/localhost"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(root / "runs" / name / "pretrain/export/model.safetensors")


@pytest.mark.parametrize("optimizer,ds,launcher", [
    ({"name": "lamb", "lr": 3e-3}, "pretrain_zero2_lamb.json", "pdsh"),
    ({"name": "onebit_lamb", "lr": 3e-3, "freeze_step": 4}, "pretrain_onebit_lamb.json", "pdsh"),
    # the same chain under mpirun: in the cluster's long set (mpirun over ssh is in CI's, and each launch costs)
    pytest.param({"name": "lamb", "lr": 3e-3}, "pretrain_zero2_lamb.json", "mpich", marks=pytest.mark.long),
], ids=["zero2_lamb", "onebit_lamb", "zero2_lamb_mpich"])
def test_pretrain_on_two_hosts_equals_the_same_run_on_one(cluster, prepared, optimizer, ds, launcher):
    """DeepSpeed's default runner (pdsh over ssh), and its MPICH runner (LAUNCHER=mpich: mpirun over ssh)."""
    name = optimizer["name"] + ("" if launcher == "pdsh" else f"-{launcher}")
    sections = {"optimizer": optimizer, "distributed": {"ds_config": str(REPO / "ds_configs" / ds)}}
    two = _config(prepared, f"{name}-2h", **sections)
    _same_prepare(prepared, f"{name}-2h")
    proc = _pretrain_two_hosts(cluster, two, LAUNCHER=launcher)
    assert proc.returncode == 0, proc.stdout[-3000:]
    if launcher == "pdsh":
        assert "bp1node1:" in proc.stdout  # pdsh prefixes each remote line with its host
    else:
        assert "cmd = mpirun" in proc.stdout
    one = _config(prepared, f"{name}-1h", **sections)
    _same_prepare(prepared, f"{name}-1h")
    _pretrain_one_host(one)
    record = json.loads((prepared / "runs" / f"{name}-2h/pretrain/stage.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    a, b = _weights(prepared, f"{name}-2h"), _weights(prepared, f"{name}-1h")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"two hosts vs one: largest weight difference {worst}"


def _steps_logged(stage: Path) -> int:
    path = stage / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def test_kill9_of_one_hosts_rank_stops_the_run_and_the_same_command_resumes(cluster, prepared):
    name = "killed-2h"
    config = _config(prepared, name)
    stage = _same_prepare(prepared, name).parent / "pretrain"
    launch = cluster.on(0, ["bash", "launch/run_stage.sh", "pretrain", str(config), str(cluster.hostfile)],
                        env=_launch_env(cluster), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
    deadline = time.time() + 300
    while _steps_logged(stage) < 6 and time.time() < deadline and launch.poll() is None:
        time.sleep(0.05)  # past the step-4 checkpoint
    victims = cluster.ranks(1)
    assert len(victims) == 1 and launch.poll() is None, "no rank running on bp1node1"
    subprocess.run(["kill", "-9", str(victims[0])], check=True)
    out, _ = launch.communicate(timeout=300)
    assert launch.returncode != 0, out[-2000:]
    assert json.loads((stage / "stage.json").read_text())["status"] != "complete"
    time.sleep(1)
    assert not cluster.ranks(0) and not cluster.ranks(1), "a rank outlived the failed launch"
    proc = _pretrain_two_hosts(cluster, config)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resum" in proc.stdout.lower()
    reference = prepared / "runs/lamb-2h/pretrain/export/model.safetensors"
    if not reference.exists():  # the uninterrupted two-host run of the same config
        straight = _config(prepared, "lamb-2h")
        _same_prepare(prepared, "lamb-2h")
        assert _pretrain_two_hosts(cluster, straight).returncode == 0
    a, b = load_file(reference), _weights(prepared, name)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"


@pytest.mark.long  # 2 launches on the two hosts; `make test-cluster` runs it
@pytest.mark.parametrize("launcher", ["pdsh", "mpich"])
def test_sigterm_to_a_two_host_launch_saves_one_step_on_every_rank_and_the_rerun_resumes_from_it(
        cluster, prepared, launcher):
    """The ranks are children of remote shells (pdsh's ssh, mpirun's hydra over ssh), not of the command the
    user signals: the stop reaches them through the stop file in the run directory."""
    name = f"stopped-2h-{launcher}"
    config = _config(prepared, name, pretrain={"checkpoint_every": 1000, "phases": [
        {"seq_len": 64, "steps": 150, "global_batch_size": 16, "micro_batch_size": 8}]})
    stage = _same_prepare(prepared, name).parent / "pretrain"
    launch = cluster.on(0, ["bash", "launch/run_stage.sh", "pretrain", str(config), str(cluster.hostfile)],
                        env=_launch_env(cluster, LAUNCHER=launcher), cwd=REPO, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while _steps_logged(stage) < 4 and time.time() < deadline and launch.poll() is None:
        time.sleep(0.05)
    assert launch.poll() is None, "the launch ended before the signal"
    launch.send_signal(signal.SIGTERM)
    out, _ = launch.communicate(timeout=300)
    assert launch.returncode == 75, out[-3000:]
    saved = json.loads((stage / "checkpoints" / "latest.json").read_text())
    assert 4 <= saved["step"] < 150, saved
    folder = stage / "checkpoints" / saved["tag"]
    assert (folder / "rank0.pt").is_file() and (folder / "rank1.pt").is_file()  # both ranks saved that step
    record = json.loads((stage / "stage.json").read_text())
    assert record["status"] == "stopped" and f"step {saved['step']}" in record["error"], record
    time.sleep(1)
    assert not cluster.leftovers(), cluster.leftovers()
    assert not list(stage.parent.glob(".stop-*"))
    proc = _pretrain_two_hosts(cluster, config, LAUNCHER=launcher)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"resumed phase 0 at step {saved['step']}" in proc.stdout, proc.stdout[-3000:]


def _readme_cluster_commands() -> list[str]:
    """The commands of the README's cluster section that start ranks on the hosts (not Slurm's)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Running on your cluster", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines()]
    starts = ("make env", "make prepare", "make pretrain", "LAUNCHER=mpich make", "bash launch/prepare_mpi.sh",
              "deepspeed --hostfile")
    return [line for line in lines if line.startswith(starts)]


@pytest.mark.long  # 3 minutes; `make test-cluster` runs it
def test_the_readme_cluster_commands_run_each_stage_on_both_hosts(cluster, prepared, tmp_path):
    """Each command as the README prints it, with a tiny config and this cluster's hostfile in place of the
    academic config and hostfiles/cluster; its effect is checked, not only its exit code."""
    commands = _readme_cluster_commands()
    shown = [c.split(" CONFIG")[0].split(" configs/")[0].strip() for c in commands]
    assert shown == ["make env HOSTFILE=hostfiles/cluster", "make prepare", "make pretrain",
                     "deepspeed --hostfile hostfiles/cluster --module pipeline pretrain --config",
                     "bash launch/prepare_mpi.sh", "LAUNCHER=mpich make pretrain"], commands
    config = _config(tmp_path, "readme")
    run = tmp_path / "runs" / "readme"
    env_file = tmp_path / "deepspeed_env"  # what the plain deepspeed form needs on the remote host
    env_file.write_text(f"DS_ACCELERATOR=cpu\nGLOO_SOCKET_IFNAME={twohost.hosts.IFACE}\nTOKENIZERS_PARALLELISM=false\n")
    for command in commands:
        line = (command.replace("configs/bert-base-academic.yaml", str(config))
                .replace("hostfiles/cluster", str(cluster.hostfile)).replace("prepare_mpi.sh " + str(config) + " 4",
                                                                            "prepare_mpi.sh " + str(config) + " 2"))
        stage = "prepare" if "prepare" in command else "pretrain" if "pretrain" in command else None
        if stage:
            shutil.rmtree(run / stage, ignore_errors=True)  # each command does the work itself
        extra = {"DS_ENV_FILE": str(env_file)} if command.startswith("deepspeed") else {}
        proc = _on_node0(cluster, ["bash", "-c", line], PATH=f"{REPO / '.venv/bin'}:{cluster.env()['PATH']}",
                         **extra)
        assert proc.returncode == 0, (command, proc.stdout[-3000:])
        if stage is None:
            assert "bp1node0" in proc.stdout and "bp1node1" in proc.stdout, proc.stdout[-3000:]
            continue
        record = json.loads((run / stage / "stage.json").read_text())
        assert record["status"] == "complete" and record["world_size"] == 2, (command, record)
        if stage == "prepare":
            assert (run / "prepare" / "manifest.json").is_file()
        else:
            assert (run / "pretrain" / "export" / "model.safetensors").is_file()


@pytest.mark.long  # `make test-cluster` runs it
def test_a_full_disk_on_one_host_fails_the_save_on_every_rank_at_once(cluster, prepared):
    """Only the second host sees a full filesystem where the checkpoint goes (a 64 kB tmpfs mounted in its
    mount namespace alone): its rank's write fails, and every rank stops together with that rank's line,
    instead of the first host's rank waiting at a barrier for distributed.timeout_minutes."""
    name = "full-2h"
    config = _config(prepared, name, pretrain={"checkpoint_every": 40, "phases": [
        {"seq_len": 64, "steps": 60, "global_batch_size": 16, "micro_batch_size": 8}]})
    stage = _same_prepare(prepared, name).parent / "pretrain"
    folder = stage / "checkpoints" / "p0-s0000040"  # the first save
    launch = cluster.on(0, ["bash", "launch/run_stage.sh", "pretrain", str(config), str(cluster.hostfile)],
                        env=_launch_env(cluster), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
    deadline = time.time() + 300
    while _steps_logged(stage) < 1 and time.time() < deadline and launch.poll() is None:
        time.sleep(0.05)  # training: the resume's clean-up of unnamed checkpoint folders is over
    folder.mkdir(parents=True)
    mounted = cluster.on(1, ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)])
    assert mounted.wait() == 0 and _steps_logged(stage) < 40, "mounted too late"
    started = time.time()
    try:
        out, _ = launch.communicate(timeout=300)
    finally:
        cluster.on(1, ["umount", "-l", str(folder)]).wait()
    assert launch.returncode == 2 and time.time() - started < 120, out[-3000:]
    errors = {line.split(": ", 1)[1] for line in out.splitlines() if ": error: " in line or line.startswith("error:")}
    assert len(errors) == 1 and "rank 1: " in next(iter(errors)) and "no space left on device" in next(iter(errors)), \
        out[-3000:]
    record = json.loads((stage / "stage.json").read_text())
    assert record["status"] == "failed" and "no space left" in record["error"], record
    assert not folder.exists()  # removed once no rank wrote to it; never named in latest.json
    time.sleep(1)
    assert not cluster.leftovers(), cluster.leftovers()
