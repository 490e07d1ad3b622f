"""The one exception type a user is meant to see.

Anything raised as `PipelineError` is printed by `python -m pipeline` as a single line and
exits with code 2; everything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A problem with the user's input (config, files, run directory), not with the code."""

    exit_code = 2

    def __str__(self) -> str:  # one line whatever the message quotes (a value with a newline in it)
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class ConfigError(PipelineError):
    """The run config cannot be read or does not validate."""


class StageInputError(PipelineError):
    """A stage's input (another stage's output, or an external file) is missing or incomplete."""


class Stopped(PipelineError):
    """Stopped on request (a signal or the deadline) after saving; the same command resumes."""

    exit_code = 75  # EX_TEMPFAIL: try again, e.g. `scontrol requeue`


class RankLost(PipelineError):
    """A collective failed because another rank went away (its process or node died, or hung past the
    timeout); the survivors stop with one line instead of the backend's traceback."""

    exit_code = 3
