"""Which config fields a stage's fingerprint covers, as dotted names, and how two sets of them differ.

A field annotated with RUNTIME says how a stage runs, not what it computes; every other field of the
sections a stage reads goes into its config hash (`RunConfig.section_hash`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel


class Runtime:
    """Field metadata: the field says how a stage runs (how often it logs, evaluates or saves, micro-batches
    at the same global batch, timeouts), not what it computes. Stage fingerprints leave such fields out, so
    changing one on a rerun resumes the stage instead of moving its output aside."""

    def __repr__(self) -> str:
        return "RUNTIME"


RUNTIME = Runtime()


def flatten(node: Any, prefix: str, result: dict[str, Any], runtime: dict[str, Any]) -> None:
    """`node` (a section, a list of sections or a value) into `result` and `runtime` by dotted name."""
    if isinstance(node, list) and any(isinstance(item, BaseModel) for item in node):
        result[f"{prefix}.#"] = len(node)  # a phase or source added or removed
        for index, item in enumerate(node):
            flatten(item, f"{prefix}.{index}", result, runtime)
        return
    if not isinstance(node, BaseModel):
        result[prefix] = json.loads(json.dumps(node, default=str))  # paths and tuples as JSON has them
        return
    for name, info in type(node).model_fields.items():
        value, where = getattr(node, name), f"{prefix}.{name}"
        if any(isinstance(m, Runtime) for m in info.metadata):
            runtime[where] = json.loads(json.dumps(value, default=str))
        else:
            flatten(value, where, result, runtime)


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """'name: old -> new' for every dotted field whose value differs (added or removed fields too)."""
    missing = "(unset)"
    return [f"{key}: {before.get(key, missing)} -> {after.get(key, missing)}"
            for key in sorted(set(before) | set(after)) if before.get(key, missing) != after.get(key, missing)]
