"""Bytes that crossed a real link: two network namespaces joined by a veth pair, one rank in each.

The kernel's interface counters, not the code's own arithmetic, say how much the compressed
phase sends against the dense all-reduce on the same link.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import hosts  # noqa: E402
import onebit_network  # noqa: E402


@pytest.mark.slow
def test_compressed_steps_send_at_most_a_sixteenth_of_the_dense_bytes_on_the_link(tmp_path):
    reason = hosts.available()
    if reason:
        pytest.skip(f"two-namespace link: {reason}")
    hosts.make_hosts(None)
    try:
        dense = onebit_network.run_pair("dense", tmp_path, preset="tiny")
        onebit = onebit_network.run_pair("onebit_adam", tmp_path, preset="tiny")
    finally:
        hosts.drop_hosts()
    # dense: the engine's fp32 ring all-reduce of ~4M gradients, ~16 MB per rank per step
    assert dense["link_bytes_per_step"] >= 0.9 * dense["counted_bytes_per_step"] > 0
    assert onebit["link_bytes_per_step"] <= dense["link_bytes_per_step"] / 16, (onebit, dense)
    # and the optimizer's own count is what the link saw, within the packet headers' share
    assert onebit["counted_bytes_per_step"] <= onebit["link_bytes_per_step"] <= 1.25 * onebit["counted_bytes_per_step"]
