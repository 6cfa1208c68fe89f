"""Exceptions that carry a one-line, user-facing message.

Command-line entry points (``experiments/*``) turn any :class:`EosJaxError` into
one line on stderr and exit code 2 (see :func:`eos_jax.cli.run`). Library code
raises the most specific subclass; messages name the bad value and what is allowed.
"""


class EosJaxError(Exception):
    """Base class of errors whose message is meant for the user as it is."""


class ConfigError(EosJaxError, ValueError):
    """An invalid configuration value (bad flag, bad hyperparameter)."""


class DataError(EosJaxError):
    """Data could not be found or read."""


class DataNotFoundError(DataError, FileNotFoundError):
    """No files for a dataset were found; the message lists where we looked."""


class MalformedDataError(DataError, ValueError):
    """A data file exists but is not in the published format (names the file)."""


class ChecksumError(DataError):
    """A downloaded file did not match its published SHA-256."""


class RunDirError(EosJaxError):
    """A run directory cannot be used (other config, nothing to resume, ...)."""


class CheckpointMismatchError(ConfigError):
    """A run's checkpoints hold a state of another structure or shape than the run would train
    (another lane grouping, device count or model). Nothing is moved or overwritten.

    Attributes:
      saved, wanted: ``[[shape, dtype], ...]`` of the checkpoint's arrays and of the run's
        (None when unknown).
      difference: a phrase naming the first difference.
    """

    def __init__(
        self, message: str, *, saved: list | None = None, wanted: list | None = None, difference: str | None = None
    ):
        super().__init__(message)
        self.saved, self.wanted, self.difference = saved, wanted, difference
