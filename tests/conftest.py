"""Shared test helpers: run the CLI the way users do, and find the real demo corpus."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO / ".cache" / "corpora"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_"))}
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def bbc_dir() -> Path:
    path = CORPORA / "bbc"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: `make data` fetches the demo corpora (make test does it)")
    return path


@pytest.fixture(scope="session")
def bbc_sample(tmp_path_factory, bbc_dir) -> Path:
    """About 300 real BBC articles (60 per class): big enough for several units, quick to prepare."""
    out = tmp_path_factory.mktemp("bbc_sample")
    for label_dir in sorted(p for p in bbc_dir.iterdir() if p.is_dir()):
        dest = out / label_dir.name
        dest.mkdir()
        for article in sorted(label_dir.glob("*.txt"))[:60]:
            shutil.copy(article, dest / article.name)
    return out
