"""The one checkpoint helper: orbax CheckpointManager over `<workdir>/checkpoints`.

Saves every `save_every` steps and at the end, keeps the newest `keep`, and
restores the latest on start, so re-running a command with the same workdir
resumes. Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save never leaves a half-written checkpoint that
a resume would pick up. A checkpoint damaged later (truncated, partly deleted,
an empty step directory) is moved aside to `<workdir>/damaged_checkpoints/`
with a warning, and the newest intact one is restored instead.

`<workdir>/checkpoints/identity.json` holds the config values that define the
run (`check_identity`): resuming under other values is a one-line
WorkdirError listing them, except for the fields of `RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

from infra.errors import ConfigError, WorkdirError

# config leaves (by last name) a resume may change: when and how to log, save,
# evaluate or stop, not what is trained
RESUMABLE_CHANGES = frozenset({
    "num_steps", "stop_after_steps", "log_every", "eval_every", "checkpoint_every",
    "keep_checkpoints", "eval_batch_size", "eval_users", "eval_base", "eval_valid",
    "candidate_chunk", "distributed", "nonfinite"})
IDENTITY_FILE = "identity.json"


def config_identity(config, names: tuple[str, ...] | None) -> dict:
  """{dotted field: value} of the config values a stage depends on (what
  `Checkpointer.check_identity` stores); `names` None: the whole config."""
  if names is None:
    return config.to_dict()
  out = {}
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    out[name] = value.to_dict() if hasattr(value, "to_dict") else value
  return out


class Checkpointer:

  def __init__(self, workdir: str, save_every: int, keep: int):
    if save_every < 1 or keep < 1:
      raise ConfigError("checkpoint_every and keep_checkpoints must be >= 1, got "
                        f"{save_every} and {keep}")
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.save_every, self.keep = save_every, keep
    self.manager, self._closed = self._open(), False

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))

  def check_identity(self, identity: dict) -> None:
    """Stores `identity` (flat or nested config values) with a new run's
    checkpoints; with existing checkpoints, a WorkdirError if it differs."""
    path = os.path.join(self.directory, IDENTITY_FILE)
    flat = _flatten(identity)
    if os.path.exists(path) and self.manager.all_steps():
      with open(path) as f:
        stored = _flatten(json.load(f))
      changed = [f"{k}: {stored.get(k, '<absent>')!r} -> {flat.get(k, '<absent>')!r}"
                 for k in sorted(set(stored) | set(flat))
                 if stored.get(k) != flat.get(k)
                 and k.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES]
      if changed:
        raise WorkdirError(
            f"{self.workdir} was trained under another config ({'; '.join(changed)}); "
            "use a new --workdir, or put the old values back to resume")
      return
    if jax.process_index():  # process 0 writes it for every process
      return
    os.makedirs(self.directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(identity, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)

  def restore_or_keep(self, state):
    """The newest intact saved state (with `state`'s shardings), or `state`
    if there is none; damaged checkpoints are moved aside with a warning."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # orbax raises many kinds for a damaged directory
        self._set_aside(step, e)
    return state

  def _set_aside(self, step: int, error: Exception) -> None:
    damaged = os.path.join(self.workdir, "damaged_checkpoints",
                           f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(damaged), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), damaged)
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else (
        type(error).__name__)
    print(f"[checkpoint] warning: step {step} in {self.directory} cannot be "
          f"restored ({type(error).__name__}: {reason}); moved to {damaged}, "
          "trying the one before", flush=True)
    self.manager.close()
    self.manager = self._open()  # re-list the steps

  def save_due(self, step: int, is_last: bool) -> bool:
    return is_last or step % self.save_every == 0

  def maybe_save(self, step: int, state, is_last: bool) -> bool:
    """Saves at every `save_every`-th step and at the last one."""
    if not self.save_due(step, is_last):
      return False
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def close(self) -> None:
    """Waits for pending asynchronous saves to finish (once)."""
    if not self._closed:
      self.manager.wait_until_finished()
      self.manager.close()
      self._closed = True


def _flatten(tree, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}; tuples become lists (as JSON stores them)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}
