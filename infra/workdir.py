"""Claiming a workdir for one run: a lock file naming the process that holds
it, and no results.json from an earlier run left in place while this one runs
(a run that fails leaves none; results.json is written only at a successful end).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from infra.errors import WorkdirError

LOCK = "run.lock"


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


@contextlib.contextmanager
def claim(workdir: str, process_index: int | None = None):
  """Holds `<workdir>/run.lock` for the block (process 0 of a multi-host run
  only) and removes an earlier run's results.json first."""
  _writable_dir(workdir)
  if process_index is None:
    import jax
    process_index = jax.process_index()
  lock = os.path.join(workdir, LOCK)
  if process_index == 0:
    _take_lock(lock)
    results = os.path.join(workdir, "results.json")
    if os.path.exists(results):
      os.remove(results)
  try:
    yield
  finally:
    if process_index == 0 and os.path.exists(lock):
      os.remove(lock)
