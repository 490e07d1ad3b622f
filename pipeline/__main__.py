"""`python -m pipeline <stage> --config FILE [--set a.b=c ...] [--force]`: dispatch only.

Commands: the stages (prepare, pretrain, search, prune, retrain, finetune), `run-all` (every
available stage in order, each skipped when up to date), `env` (what each rank of this
launch sees, checked over a real process group), `plan` (days and cost on a cluster) and
`hostfile` (check a hostfile before a launch uses it) and `report` (the run's page with figures,
`<run>/report/report.md`, rebuilt from the run directory).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import PipelineError, Stopped
from pipeline.stages import ORDER


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    # the deepspeed launcher appends --local_rank=N; the env says the same thing, so it is ignored
    common.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    staged = argparse.ArgumentParser(add_help=False, parents=[common])
    staged.add_argument("--config", required=True, help="run config (YAML)")
    staged.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config value (repeatable)")
    staged.add_argument("--force", action="store_true", help="rerun even when up to date")

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0],
                                     parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in ORDER:
        commands.add_parser(stage, parents=[staged], help=f"run the {stage} stage")
    commands.add_parser("run-all", parents=[staged], help="run every available stage in order")
    commands.add_parser("report", parents=[staged], help="write <run>/report/report.md and its figures")
    plan = commands.add_parser("plan", parents=[common], help="days and cost of the run config on a cluster")
    plan.add_argument("--config", required=True, help="run config (YAML)")
    plan.add_argument("--cluster", required=True, help="cluster description (YAML, see clusters/)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                      help="override a run config value (repeatable)")
    plan.add_argument("--json", default=None, help="also write the plan here (and a PNG beside it)")
    plan.add_argument("--budget-days", type=float, default=None, help="rank the options that fit this many days")
    hostfile = commands.add_parser("hostfile", parents=[common], help="check a hostfile; print its hosts and slots")
    hostfile.add_argument("path", help="hostfile (one 'HOSTNAME slots=N' line per node)")
    env = commands.add_parser("env", parents=[common], help="show and check the launch environment")
    env.add_argument("--json", default=None, help="also write what every rank saw to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "env":
            from pipeline.envcheck import run_env_check

            return run_env_check(args.json)
        if args.command == "hostfile":
            from pipeline.hostfile import read_hostfile

            print("\n".join(f"{host} {slots}" for host, slots in read_hostfile(args.path)))
            return 0
        if args.command == "plan":
            from pipeline.plan.command import run_plan

            return run_plan(args.config, args.cluster, args.overrides, args.json, args.budget_days)
        if args.command == "report":
            from pipeline.report.command import run_report

            return run_report(args.config, args.overrides)
        from pipeline.cli import run_command

        return run_command(args.command, args.config, args.overrides, args.force)
    except PipelineError as exc:
        print(f"{'stopped' if isinstance(exc, Stopped) else 'error'}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
