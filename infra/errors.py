"""Errors that are the user's to fix: main.py prints them as one line, no traceback."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""
