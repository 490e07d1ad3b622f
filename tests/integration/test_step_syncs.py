"""The whole pretrain step through DeepSpeed in bf16 reads nothing back to the host (LAMB clips on the device).

In fp32 DeepSpeed 0.19.8's ZeRO step still checks the global norm's validity once (for every dtype but bf16),
the one read left; bf16 is the GPU path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env


@pytest.mark.slow
def test_the_engine_step_with_lamb_reads_nothing_back_and_the_counter_sees_deepspeeds_checks():
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("step_sync_worker.py"))], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["lamb bf16"] == [] and seen["lamb fp32"] == ["_local_scalar_dense"], seen
    assert len(seen["adamw bf16"]) == 4, seen  # DeepSpeed's clipping (2 groups), norm check and overflow check
