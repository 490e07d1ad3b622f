"""`python launch/rank.py ARGS` = `python -m pipeline ARGS`, for launchers that need a script path.

DeepSpeed 0.19.8's MPI runners put `-m` before their own helper script when given `--module`
(`python -u -m .../launcher_helper.py`), which fails on every rank; a script path avoids it.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
