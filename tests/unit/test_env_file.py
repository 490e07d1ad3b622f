"""The env file that carries this shell's variables to ranks on other hosts (launch/supervise.py)."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def _supervise():
    spec = importlib.util.spec_from_file_location("supervise", REPO / "launch/supervise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_user_files_come_first_then_the_forwarded_variables_that_are_set(tmp_path):
    user = tmp_path / ".deepspeed_env"
    user.write_text("NCCL_IB_HCA=mlx5_0\n# a comment\n\nHF_HOME=/shared/hf\n")
    environ = {"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "eth1", "NCCL_DEBUG": "", "HOME": "/root",
               "PIPELINE_FORWARD_ENV": "MY_FLAG HOME", "MY_FLAG": "1"}
    lines = _supervise().env_file_lines(environ, [tmp_path / "missing", user])
    assert lines == ["NCCL_IB_HCA=mlx5_0", "HF_HOME=/shared/hf", "DS_ACCELERATOR=cpu", "GLOO_SOCKET_IFNAME=eth1",
                     "MY_FLAG=1", "HOME=/root"]


def test_the_file_is_written_and_names_nothing_unset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = _supervise().write_env_file({"DS_ACCELERATOR": "cpu"})
    try:
        assert path.read_text() == "DS_ACCELERATOR=cpu\n"
    finally:
        path.unlink()
