"""Exceptions that carry a one-line, user-facing message.

Command-line entry points (``experiments/*``) turn any :class:`EosJaxError` into
one line on stderr and exit code 2 (see :func:`eos_jax.cli.run`). Library code
raises the most specific subclass; messages name the bad value and what is allowed.
"""


class EosJaxError(Exception):
    """Base class of errors whose message is meant for the user as it is.

    Examples:
      >>> from eos_jax.errors import ConfigError, EosJaxError
      >>> try:
      ...     raise ConfigError("lr=-1.0; allowed: a positive float")
      ... except EosJaxError as e:
      ...     print(e)
      lr=-1.0; allowed: a positive float
    """


class ConfigError(EosJaxError, ValueError):
    """An invalid configuration value (bad flag, bad hyperparameter).

    Examples:
      >>> from eos_jax.errors import ConfigError
      >>> issubclass(ConfigError, ValueError)
      True
      >>> raise ConfigError("steps=0; allowed: a positive integer")
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: steps=0; allowed: a positive integer
    """


class DataError(EosJaxError):
    """Data could not be found or read.

    Examples:
      >>> from eos_jax.errors import DataError, DataNotFoundError, MalformedDataError
      >>> issubclass(DataNotFoundError, DataError), issubclass(MalformedDataError, DataError)
      (True, True)
    """


class DataNotFoundError(DataError, FileNotFoundError):
    """No files for a dataset were found; the message lists where we looked.

    Examples:
      >>> from eos_jax.errors import DataNotFoundError
      >>> try:
      ...     raise DataNotFoundError("no files for mnist in /tmp/nowhere")
      ... except FileNotFoundError as e:  # also a FileNotFoundError
      ...     print(e)
      no files for mnist in /tmp/nowhere
    """


class MalformedDataError(DataError, ValueError):
    """A data file exists but is not in the published format (names the file).

    Examples:
      >>> from eos_jax.errors import MalformedDataError
      >>> raise MalformedDataError("x.idx: bad magic number 0x00000000")
      Traceback (most recent call last):
      ...
      eos_jax.errors.MalformedDataError: x.idx: bad magic number 0x00000000
    """


class ChecksumError(DataError):
    """A downloaded file did not match its published SHA-256.

    Examples:
      >>> from eos_jax.errors import ChecksumError, DataError
      >>> isinstance(ChecksumError("sha256 mismatch"), DataError)
      True
    """


class RunDirError(EosJaxError):
    """A run directory cannot be used (other config, nothing to resume, ...).

    Examples:
      >>> from eos_jax.errors import EosJaxError, RunDirError
      >>> isinstance(RunDirError("runs/a holds another config"), EosJaxError)
      True
    """


class CheckpointMismatchError(ConfigError):
    """A run's checkpoints hold a state of another structure or shape than the run would train
    (another lane grouping, device count or model). Nothing is moved or overwritten.

    Attributes:
      saved, wanted: ``[[shape, dtype], ...]`` of the checkpoint's arrays and of the run's
        (None when unknown).
      difference: a phrase naming the first difference.

    Examples:
      >>> from eos_jax.errors import CheckpointMismatchError
      >>> e = CheckpointMismatchError("checkpoint holds 2 lanes, the run 4", difference="lanes 2 != 4")
      >>> e.difference, e.saved
      ('lanes 2 != 4', None)
      >>> isinstance(e, ValueError)
      True
    """

    def __init__(
        self, message: str, *, saved: list | None = None, wanted: list | None = None, difference: str | None = None
    ):
        super().__init__(message)
        self.saved, self.wanted, self.difference = saved, wanted, difference


class RunWriteError(EosJaxError):
    """A run could not write its files (disk full, a directory that became unwritable, a checkpoint
    that could not be committed). The message names what failed, the last complete checkpoint and
    how to resume; the command lines print it as one line and exit with code 1.

    Attributes:
      what: the file or directory that could not be written.
      reason: the operating system's words (``No space left on device``, ...).
      run_dir: the run directory.
      last_checkpoint: the newest committed checkpoint step of each lane group (``None``: none yet).

    Examples:
      >>> from eos_jax.errors import RunWriteError
      >>> e = RunWriteError("runs/a/metrics.jsonl", "No space left on device", "runs/a", [300])
      >>> print(e)
      could not write runs/a/metrics.jsonl: No space left on device; the last complete checkpoint is step 300 in runs/a/checkpoints; make room there and resume the run
      >>> e.exit_code
      1
    """

    exit_code = 1

    def __init__(self, what: str, reason: str, run_dir: str, last_checkpoint: list[int | None]):
        self.what, self.reason, self.run_dir, self.last_checkpoint = what, reason, run_dir, last_checkpoint
        steps = sorted({s for s in last_checkpoint if s is not None})
        if not steps:
            kept = "no checkpoint was committed yet (a resumed run starts from step 0)"
        elif len(last_checkpoint) == 1 or len(steps) == 1:
            kept = f"the last complete checkpoint is step {steps[-1]} in {run_dir}/checkpoints"
        else:
            kept = f"the last complete checkpoints are steps {', '.join(map(str, last_checkpoint))} (per lane group) in {run_dir}/checkpoints"
        super().__init__(f"could not write {what}: {reason}; {kept}; make room there and resume the run")
