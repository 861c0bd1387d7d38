"""The one checkpoint helper: orbax CheckpointManager over `<workdir>/checkpoints`.

Saves every `save_every` steps and at the end, keeps the newest `keep`, and
restores the latest on start, so re-running a command with the same workdir
resumes. Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save never leaves a half-written checkpoint that
a resume would pick up (the temporary directory is removed at the next start).

The config identity (the config values that define the run,
`config_identity`) is saved inside every step, as the `identity` entry of the
step's orbax custom metadata, which orbax writes into the temporary directory
before the rename: a step and its identity are committed, and lost, together.
Before a step is restored its identity is compared with this run's: other
values are a one-line WorkdirError listing them, except for the fields of
`RESUMABLE_CHANGES`. A step whose state reads whole but whose identity is
missing or unreadable is a CheckpointError naming the file; it is never
resumed unchecked. A step written before identities lived in the steps (its
metadata has no `identity` entry) is checked against the
`checkpoints/identity.json` its run wrote beside the steps, and is a
CheckpointError without that file.

A restore that fails is sorted by kind. If the step's files cannot be read
even without a target (truncated, torn or missing files, an empty step
directory: OSError or ValueError from orbax, JSON or TensorStore), the step is
damaged: it is moved aside to `<workdir>/damaged_checkpoints/` with a warning
and the step before is tried. If they read whole, the saved state does not fit
this run's (a changed parameter tree or shape, a code error): a
CheckpointError naming the step and the cause, with nothing moved, so a run
never starts over from scratch beside its checkpoints.

A save the disk refuses (out of space, permissions, another OS write error,
raised as OSError or as TensorStore's `RESOURCE_EXHAUSTED: ...` ValueError) is
a CheckpointError naming the directory and the bytes a checkpoint needs.
Orbax never commits a failed step and deletes older steps only after a
commit, so the steps saved before stay intact and a rerun resumes from them.

The workdir may be on object storage (gs://...): orbax and TensorStore write
there directly, and orbax commits a step by a marker object instead of a
rename (object stores have none); the files read here go through
infra/paths.py. Setting a damaged step aside there copies it object by object.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import sys
import time

import jax
import orbax.checkpoint as ocp

from infra import paths
from infra.errors import CheckpointError, ConfigError, WorkdirError

# config leaves (by last name) a resume may change: when and how to log, save,
# evaluate or stop, not what is trained
RESUMABLE_CHANGES = frozenset({
    "num_steps", "stop_after_steps", "log_every", "eval_every", "checkpoint_every",
    "keep_checkpoints", "eval_batch_size", "eval_users", "eval_base", "eval_valid",
    "candidate_chunk", "distributed", "nonfinite", "remat"})
# fields added to the configs after runs were saved, with the value that
# behaves as those runs did: a step saved before a field existed matches a
# config that holds this value there
ADDED_FIELDS = {"rl.lora_rank": 0, "rl.lora_alpha": 16.0,
                "data.synthetic.communities": 0}
IDENTITY_KEY = "identity"  # the entry of a step's custom metadata
# the JSON file in which orbax keeps a step's metadata, custom_metadata among
# it; read directly because `CheckpointManager.metadata(step)` answers {} for
# a file that is missing or cut short, which must be told apart from a step
# written before identities lived in the steps
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
# where the identity lived before it moved into the steps; still read for
# steps written then
LEGACY_IDENTITY_FILE = "identity.json"
# TensorStore raises an OS error as ValueError("<absl status code>: ..."):
# the codes the file driver maps OS write errors to
_STORAGE_STATUS = re.compile(r"^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|"
                             r"FAILED_PRECONDITION|UNAVAILABLE|DATA_LOSS|"
                             r"OUT_OF_RANGE|INTERNAL|UNKNOWN): ")
_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def changed_fields(stored: dict, current: dict) -> list[str]:
  """"field: old -> new" for every field whose value differs between two
  identities, but those of RESUMABLE_CHANGES and a field the stored one
  lacks whose current value is its ADDED_FIELDS value."""
  stored, flat = _flatten(stored), _flatten(current)
  added = lambda k: (k not in stored and k in ADDED_FIELDS  # noqa: E731
                     and flat.get(k) == ADDED_FIELDS[k])
  return [f"{k}: {stored.get(k, '<absent>')!r} -> {flat.get(k, '<absent>')!r}"
          for k in sorted(set(stored) | set(flat))
          if stored.get(k) != flat.get(k) and not added(k)
          and k.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES]


def config_identity(config, names: tuple[str, ...] | None) -> dict:
  """{dotted field: value} of the config values a stage depends on (what
  `Checkpointer` stores in every step); `names` None: the whole config."""
  if names is None:
    return config.to_dict()
  out = {}
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    out[name] = value.to_dict() if hasattr(value, "to_dict") else value
  return out


class _RefusedSaveLogs(logging.Filter):
  """Drops orbax's logged tracebacks of a save the disk refused: its save
  threads log each error they then raise to us at the next save or `close`,
  where it becomes the one-line CheckpointError (any other error keeps its
  log and its traceback)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return error is None or not _is_storage_error(error)


_REFUSED_SAVE_LOGS = _RefusedSaveLogs()


def _quiet_closed_loop_callbacks(unraisable) -> None:
  """sys.unraisablehook that drops TensorStore's callbacks into an event loop
  orbax already closed: when one array write of a save fails, orbax closes the
  save's loop, and each write still in flight then reports "Event loop is
  closed" as an unraisable traceback (47 of them for a full disk under
  configs/default.py:tiny), though the save's error itself is raised to us.
  Everything else goes to the hook that was there before."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return
  _quiet_closed_loop_callbacks.previous(unraisable)


def _quiet_refused_saves() -> None:
  """Installs the two filters above, once per process."""
  # orbax logs through absl; asyncio logs the futures of the failed writes
  # no one awaited ("Future exception was never retrieved")
  for logger in ("absl", "asyncio"):
    logging.getLogger(logger).addFilter(_REFUSED_SAVE_LOGS)  # a no-op when there
  if sys.unraisablehook is not _quiet_closed_loop_callbacks:
    _quiet_closed_loop_callbacks.previous = sys.unraisablehook
    sys.unraisablehook = _quiet_closed_loop_callbacks


class Checkpointer:
  """Saves and restores one run's TrainState under `<workdir>/checkpoints`,
  each step stamped with `identity` (flat or nested config values, made
  JSON: tuples become lists, other non-JSON values their str)."""

  def __init__(self, workdir: str, save_every: int, keep: int, identity: dict):
    if save_every < 1 or keep < 1:
      raise ConfigError("checkpoint_every and keep_checkpoints must be >= 1, got "
                        f"{save_every} and {keep}")
    self.workdir = paths.resolve(workdir)  # a local one made absolute
    self.directory = paths.join(self.workdir, "checkpoints")
    self.save_every, self.keep = save_every, keep
    self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
    self.state_bytes = 0  # of the last state saved: what a checkpoint needs
    _quiet_refused_saves()
    self.manager, self._closed = self._open(), False

  def _open(self) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a save killed or refused by the disk leaves its
    # temporary directory; the next start removes it
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                             cleanup_tmp_directories=True))

  # --- restore -----------------------------------------------------------------

  def restore_or_keep(self, state):
    """The newest intact saved state (with `state`'s shardings) once its
    identity matches, or `state` if no step is left; damaged steps are moved
    aside with a warning; see the module docstring for what raises."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      stored, missing = self._stored_identity(step)
      if stored is not None:  # before restoring: a changed config says so
        self._check_identity(stored)
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as error:  # orbax raises many kinds: sorted by cause
        if not self._damaged(step):
          raise CheckpointError(
              f"step {step} in {self.directory} cannot be restored into this "
              f"run's state ({_one_line(error)}); its files read whole, so it "
              "is left in place: the code or model that wrote it differs from "
              "this one; resume it with the code that wrote it, or use a new "
              "--workdir") from error
        self._set_aside(step, error)
        continue
      if stored is None:
        raise CheckpointError(missing)
      return restored
    return state

  def _stored_identity(self, step: int) -> tuple[dict | None, str]:
    """(identity, "") of a step: its own, else (a step written before they
    lived in the steps) the legacy identity.json; or (None, why not), the
    one-line error to raise if the step's state reads whole."""
    step_dir = paths.join(self.directory, str(step))
    path = paths.join(step_dir, STEP_METADATA_FILE)
    try:
      custom = json.loads(paths.read_text(path)).get("custom_metadata") or {}
      if IDENTITY_KEY in custom:
        return custom[IDENTITY_KEY], ""
      why = (f"{path} has no '{IDENTITY_KEY}' entry: the step was written "
             "before checkpoints carried their config")
    except FileNotFoundError:
      why = f"{path} is missing"
    except (OSError, ValueError, AttributeError) as e:  # cut short, not a dict
      why = f"{path} cannot be read ({_one_line(e)})"
    legacy = paths.join(self.directory, LEGACY_IDENTITY_FILE)
    try:
      stored = json.loads(paths.read_text(legacy))
      print(f"[checkpoint] step {step} carries no config identity ({why}); "
            f"checked against {legacy}", flush=True)
      return stored, ""
    except FileNotFoundError:
      why += f", and {legacy} does not exist"
    except (OSError, ValueError) as e:
      why += f", and {legacy} cannot be read ({_one_line(e)})"
    return None, (f"step {step} in {self.directory} cannot be checked against "
                  f"this run's config: {why}. Move {step_dir} out of "
                  f"{self.directory} to resume from the step before it (or to "
                  "start over if it is the only one), or use a new --workdir")

  def _check_identity(self, stored: dict) -> None:
    """A WorkdirError listing the fields whose values differ from `stored`
    (but those of RESUMABLE_CHANGES)."""
    changed = changed_fields(stored, self.identity)
    if changed:
      raise WorkdirError(
          f"{self.workdir} was trained under another config ({'; '.join(changed)}); "
          "use a new --workdir, or put the old values back to resume")

  def _damaged(self, step: int) -> bool:
    """Whether the step's own files cannot be read: restored without a target
    (every array as saved), an OSError or ValueError (orbax, JSON and
    TensorStore read errors) says they are torn; success, or a code error,
    says the step is whole and the target was at fault."""
    try:
      self.manager.restore(step, args=ocp.args.StandardRestore())
    except (OSError, ValueError):
      return True
    except Exception:  # noqa: BLE001 (a code error: the step is not to blame)
      return False
    return False

  def _set_aside(self, step: int, error: Exception) -> None:
    aside = paths.join(self.workdir, "damaged_checkpoints")
    damaged = paths.join(aside, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    paths.makedirs(aside)
    paths.move(paths.join(self.directory, str(step)), damaged)
    print(f"[checkpoint] warning: step {step} in {self.directory} cannot be "
          f"restored ({_one_line(error)}); moved to {damaged}, trying the one "
          "before", flush=True)
    self.manager.close()
    self.manager = self._open()  # re-list the steps

  # --- save ----------------------------------------------------------------------

  def save_due(self, step: int, is_last: bool) -> bool:
    return is_last or step % self.save_every == 0

  def maybe_save(self, step: int, state, is_last: bool) -> bool:
    """Saves at every `save_every`-th step and at the last one (asynchronously:
    a refused write surfaces at the next save or at `close`)."""
    if not self.save_due(step, is_last):
      return False
    self.state_bytes = sum(getattr(leaf, "nbytes", 0)
                           for leaf in jax.tree.leaves(state))
    with self._writing():
      return self.manager.save(step, args=ocp.args.StandardSave(state), force=True,
                               custom_metadata={IDENTITY_KEY: self.identity})

  def close(self) -> None:
    """Waits for pending asynchronous saves to finish (once)."""
    if self._closed:
      return
    self._closed = True
    with self._writing():
      try:
        self.manager.wait_until_finished()
      finally:
        self.manager.close()

  @contextlib.contextmanager
  def _writing(self):
    """Turns a save the disk refused into a one-line CheckpointError."""
    try:
      yield
    except (OSError, ValueError) as error:
      if not _is_storage_error(error):
        raise
      raise CheckpointError(self._refused_save(error)) from error

  def _refused_save(self, error: Exception) -> str:
    """The message for a refused save: the directory, the bytes a checkpoint
    needs (its arrays' size, before orbax's compression), what is kept."""
    needs = f"a checkpoint of this run needs about {_size(self.state_bytes)}"
    steps = ocp.utils.checkpoint_steps(self.directory)  # committed ones only
    kept = (f"the checkpoints saved before are intact (latest: step {max(steps)}),"
            " and the same command resumes from there" if steps else
            "no checkpoint was saved before: the same command starts over")
    free = paths.free_bytes(self.directory)  # None on object storage
    if _out_of_space(error) and free is not None:
      return (f"out of space saving a checkpoint to {self.directory}: {needs}, "
              f"{_size(free)} are free there; {kept} once space is freed "
              f"({_one_line(error)})")
    return (f"cannot save a checkpoint to {self.directory} ({_one_line(error)}); "
            f"{needs}; {kept} once that is fixed")


def _is_storage_error(error: BaseException) -> bool:
  """An OS error from the disk: OSError, or TensorStore's status ValueError."""
  return isinstance(error, OSError) or bool(_STORAGE_STATUS.match(str(error)))


def _out_of_space(error: BaseException) -> bool:
  if isinstance(error, OSError):
    return error.errno in _OUT_OF_SPACE_ERRNOS
  return str(error).startswith("RESOURCE_EXHAUSTED")


def _size(num_bytes: int) -> str:
  """1234567 -> '1.2 MB (1,234,567 bytes)'."""
  scaled = next((f"{num_bytes / 10 ** p:.1f} {unit}" for p, unit in
                 ((12, "TB"), (9, "GB"), (6, "MB"), (3, "kB"))
                 if num_bytes >= 10 ** p), None)
  return f"{scaled} ({num_bytes:,} bytes)" if scaled else f"{num_bytes:,} bytes"


def _one_line(error: BaseException, limit: int = 200) -> str:
  """`Type: first line of the message`, cut to `limit` characters."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _flatten(tree, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}; tuples become lists (as JSON stores them)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}
