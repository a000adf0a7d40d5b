"""Exceptions raised by QPruner. Each message says what was wrong, what was expected, how to fix it."""


class QPrunerError(Exception):
    """Base class for every error QPruner raises on purpose."""


class ConfigError(QPrunerError):
    """A job file or override is invalid. ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems, source: str = "job config"):
        self.problems = list(problems) if not isinstance(problems, str) else [problems]
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class ModelError(QPrunerError):
    """A model could not be loaded, or its architecture is not supported."""


class PlanError(QPrunerError):
    """A precision plan does not fit the model it is applied to."""


class BackendError(QPrunerError):
    """An optional backend (bitsandbytes, peft, ray, CUDA) is missing or failed."""


class TrialFailed(QPrunerError):
    """A trial could not produce a result (NaN loss, out of memory ...). The search goes on."""


class ResultsError(QPrunerError):
    """A results directory is missing, corrupt, in use, or holds a different run than the one asked for."""


class SearchIncomplete(QPrunerError):
    """A search ended before training ``search.num_trials`` trials (interrupted, or its results could not be
    written): what is recorded stands, and the same command continues it. ``exit_code``: 130 when interrupted."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
