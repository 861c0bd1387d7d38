"""Claiming a workdir for one run: a lock file naming the process that holds
it, the workflow that owns it, and no results.json from an earlier run left in
place while this one runs (a run that fails leaves none; results.json is
written only at a successful end).

A workdir belongs to one workflow: the first run to claim it records its
workflow in `<workdir>/workflow.json`, and a run of another workflow is
refused with nothing touched (per-checkpoint identity checks cannot catch it:
another workflow may write other folders and replace results.json). A workdir
"of ours" is a new or empty directory (one holding only the lock or the
record counts as empty), or one whose workflow.json names its workflow (or,
for a run written before workflow.json existed, its results.json's
config.workflow). Any other non-empty directory is refused too: a run must not
write into a directory of the user's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from infra.errors import WorkdirError
from infra.results import write_json

LOCK = "run.lock"
OWNER = "workflow.json"  # {"workflow": config.workflow} of the run it holds


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _writable_dir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable")


def _take_lock(path: str) -> None:
  """Creates `path` exclusively; a lock whose process is gone (same host) is
  taken over with a warning."""
  me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}
      pid, host = holder.get("pid"), holder.get("host")
      if isinstance(pid, int) and host == me["host"] and not _alive(pid):
        print(f"[workdir] warning: taking over {path} from process {pid}, which "
              "is gone", flush=True)
        os.remove(path)
        continue
      raise WorkdirError(
          f"{os.path.dirname(path)} is in use by process {pid} on {host} since "
          f"{holder.get('since')}; wait for it, use another --workdir, or delete "
          f"{path} if that run is gone") from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return
  raise WorkdirError(f"cannot take the lock {path}")


LAUNCH_LOGS = "launch"  # the TPU launcher's job logs (infra/launch_tpu_vm.py)


def _contents(workdir: str) -> list[str]:
  """The names in `workdir` other than the lock, the owner record (and the
  record's temporary file, left if a write was killed) and the launcher's
  logs, which it copies there from the job's first second."""
  own = {LOCK, OWNER, OWNER + ".tmp", LAUNCH_LOGS}
  return sorted(name for name in os.listdir(workdir) if name not in own)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      payload = json.load(f)
  except (OSError, ValueError):
    return {}
  return payload if isinstance(payload, dict) else {}


def owner(workdir: str) -> str | None:
  """The workflow whose run `workdir` holds, or None if nothing names one:
  workflow.json, else (a run from before workflow.json) results.json."""
  recorded = _read_json(os.path.join(workdir, OWNER)).get("workflow")
  if recorded is None:
    config = _read_json(os.path.join(workdir, "results.json")).get("config")
    recorded = config.get("workflow") if isinstance(config, dict) else None
  return recorded if isinstance(recorded, str) else None


def _check_owner(workdir: str, workflow: str) -> None:
  """Raises WorkdirError unless `workdir` is empty or holds a `workflow` run."""
  contents = _contents(workdir)
  if not contents:
    return
  found = owner(workdir)
  if found is None:
    shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
    raise WorkdirError(
        f"--workdir={workdir} is not empty ({shown}) and holds no run of ours "
        f"(no {OWNER}); nothing was written: use a new or empty --workdir")
  if found != workflow:
    raise WorkdirError(
        f"--workdir={workdir} holds a {found} run and this config's workflow is "
        f"{workflow}; nothing was written: use another --workdir for {workflow}, "
        f"or a {found} config to resume that run")


@contextlib.contextmanager
def claim(workdir: str, workflow: str | None = None,
          process_index: int | None = None):
  """Holds `<workdir>/run.lock` for the block (process 0 of a multi-host run
  only), checks that the workdir is empty or `workflow`'s and records
  `workflow` as its owner, and removes an earlier run's results.json first.
  A refused workdir is left as it was. `workflow=None` (a caller that is not a
  workflow's run) takes the lock only."""
  _writable_dir(workdir)
  if process_index is None:
    import jax
    process_index = jax.process_index()
  lock = os.path.join(workdir, LOCK)
  if process_index == 0:
    _take_lock(lock)
    try:
      if workflow is not None:  # under the lock: two runs never both pass
        _check_owner(workdir, workflow)
        write_json(os.path.join(workdir, OWNER), {"workflow": workflow})
    except BaseException:
      os.remove(lock)
      raise
    results = os.path.join(workdir, "results.json")
    if os.path.exists(results):
      os.remove(results)
  try:
    yield
  finally:
    if process_index == 0 and os.path.exists(lock):
      os.remove(lock)
