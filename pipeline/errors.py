"""The few error types the CLI maps to exit codes: a user's mistake (2) or a runtime failure (1)."""


class PipelineError(Exception):
    """A runtime failure: the message says what went wrong and what to do. Exit code 1."""

    exit_code = 1


class UsageError(PipelineError):
    """A mistake in the config or the command line. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """The config file is missing, unreadable or invalid."""


class ArtifactError(PipelineError):
    """An artifact is missing, truncated or does not match the sha256 the manifest recorded."""


class StageSkipped(PipelineError):
    """A stage cannot run on this machine (e.g. no TensorRT); the reason is the message."""


class UndeclaredRead(RuntimeError):
    """A stage read another stage its row of the runner's table (pipeline/runner.py) does not declare: a
    defect of one-pipeline, not a user's mistake (its fingerprint would miss that input), so not a
    PipelineError: it is shown with its traceback."""
