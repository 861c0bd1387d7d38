"""Errors that are the user's to fix: main.py prints them as one line, no
traceback, and exits with code 2. Each message names the field, file (and
line) or directory at fault and what to do."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


class DataError(ValueError):
  """A data file that cannot be read as its format says: `file:line: what`."""


class DivergedError(RuntimeError):
  """Training went non-finite, or never changed the model: its numbers would
  be a broken model's, so none are reported."""


class WorkdirError(RuntimeError):
  """The workdir cannot be used: another run holds it, it was written under a
  different config, or it is not a writable directory."""


class CheckpointError(WorkdirError):
  """A checkpoint of the workdir cannot be used or written: its config
  identity is missing or unreadable, its saved state does not fit the state
  being trained, or the disk refused a save (out of space, permissions). The
  message names the step or directory, the cause and what to do."""


class ModelFileError(ValueError):
  """A model file the config points at (a pretrained checkpoint, a tokenizer)
  exists but cannot be used: not the layout the loader reads, a parameter it
  does not know or lacks, a wrong shape, or unparseable. The message names
  the path (and key) at fault."""


class Preempted(Exception):
  """Training stopped before its last step with a checkpoint saved at the step
  boundary, so a rerun resumes from it: SIGTERM or a multi-host preemption
  notice arrived, or (`requested`) `stop_after_steps` said to stop there."""

  def __init__(self, message: str, requested: bool = False):
    super().__init__(message)
    self.requested = requested


USER_ERRORS = (ConfigError, DataError, DivergedError, WorkdirError,
               ModelFileError, FileNotFoundError)
