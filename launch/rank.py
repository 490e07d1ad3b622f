"""`python launch/rank.py ARGS` = `python -m pipeline ARGS`, for launchers that need a script path.

DeepSpeed 0.19.8's MPI runners put `-m` before their own helper script when given `--module`
(`python -u -m .../launcher_helper.py`), which fails on every rank; a script path avoids it.

That helper also drops the rank's exit code (it waits for the rank and exits 0), so mpirun reports
success for a rank that failed or stopped to resume (75). Each rank therefore writes its exit code
beside the launch's stop file (`launch/supervise.py`), which takes the ranks' codes from there.
"""

import os
import runpy


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 1


def record(code: int) -> None:
    stop_file = os.environ.get("PIPELINE_STOP_FILE")
    if stop_file:
        with open(f"{stop_file}.exit-rank{os.environ.get('RANK', '0')}", "w") as out:
            out.write(f"{code}\n")


if __name__ == "__main__":
    try:
        runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
    except BaseException as exc:
        record(exit_code(exc))
        raise
    record(0)
