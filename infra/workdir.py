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

The workdir may be local or on object storage (gs://...: infra/paths.py). The
lock is created only if absent: O_EXCL locally and on GCS a create-if-absent
upload (ifGenerationMatch=0), so of two runs started at once exactly one
holds it; on another scheme without such a write (`paths.ATOMIC_CREATE`) a
one-line note says it only stops a run started after this one. A lock whose
process is gone is taken over only on the host that wrote it (a process id
means nothing elsewhere): the lock of a run killed with its VM is deleted by
the TPU launcher's requeue, or by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from infra import paths
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
  if paths.is_remote(workdir):
    _object_store_dir(workdir)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable")


def _object_store_dir(workdir: str) -> None:
  """An object-store workdir must not be an object itself (whether it can be
  written is learnt from the lock's write, `_take_lock`)."""
  try:
    is_object = paths.exists(workdir) and not paths.isdir(workdir)
  except OSError as e:  # no such bucket, no credentials, ...
    raise WorkdirError(f"--workdir={workdir} cannot be read: {_reason(e)}") from None
  if is_object:
    raise WorkdirError(f"--workdir={workdir} is an object, not a directory")
  if paths.scheme(workdir) not in paths.ATOMIC_CREATE:
    print(f"[workdir] note: {paths.scheme(workdir)}:// has no create-if-absent "
          "write here, so the lock stops a run started after this one but not "
          "one started at the same moment (docs/accelerators.md)", flush=True)


def _reason(error: OSError) -> str:
  """Why object storage refused: gcsfs raises HTTP 404 (a missing bucket) as
  FileNotFoundError and 403 as PermissionError, naming only the URL."""
  if isinstance(error, FileNotFoundError):
    return "no such bucket"
  text = error.strerror or str(error).strip()
  text = text.splitlines()[0] if text else ""
  if isinstance(error, PermissionError):
    return f"permission denied ({text})"
  return f"{type(error).__name__}: {text}"


def _take_lock(path: str) -> None:
  """Creates `path` only if absent (`paths.create_new`); a lock whose process
  is gone (same host) is taken over with a warning."""
  me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}
  for _ in range(2):
    try:
      paths.create_new(path, json.dumps(me))
    except FileExistsError:
      holder = _read_json(path)
      pid, host = holder.get("pid"), holder.get("host")
      if isinstance(pid, int) and host == me["host"] and not _alive(pid):
        print(f"[workdir] warning: taking over {path} from process {pid}, which "
              "is gone", flush=True)
        paths.remove(path)
        continue
      raise WorkdirError(
          f"{paths.parent(path)} is in use by process {pid} on {host} since "
          f"{holder.get('since')}; wait for it, use another --workdir, or delete "
          f"{path} if that run is gone") from None
    except OSError as e:  # object storage: no bucket, no permission, ...
      if not paths.is_remote(path):
        raise
      raise WorkdirError(f"--workdir={paths.parent(path)} cannot be written "
                         f"({path}: {_reason(e)})") from None
    return
  raise WorkdirError(f"cannot take the lock {path}")


LAUNCH_LOGS = "launch"  # the TPU launcher's job logs (infra/launch_tpu_vm.py)


def _contents(workdir: str) -> list[str]:
  """The names in `workdir` other than the lock, the owner record (and the
  record's temporary file, left if a write was killed) and the launcher's
  logs, which it copies there from the job's first second."""
  own = {LOCK, OWNER, OWNER + ".tmp", LAUNCH_LOGS}
  return sorted(name for name in paths.listdir(workdir) if name not in own)


def _read_json(path: str) -> dict:
  try:
    payload = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return {}
  return payload if isinstance(payload, dict) else {}


def owner(workdir: str) -> str | None:
  """The workflow whose run `workdir` holds, or None if nothing names one:
  workflow.json, else (a run from before workflow.json) results.json."""
  recorded = _read_json(paths.join(workdir, OWNER)).get("workflow")
  if recorded is None:
    config = _read_json(paths.join(workdir, "results.json")).get("config")
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
  lock = paths.join(workdir, LOCK)
  if process_index == 0:
    _take_lock(lock)
    try:
      if workflow is not None:  # under the lock: two runs never both pass
        _check_owner(workdir, workflow)
        write_json(paths.join(workdir, OWNER), {"workflow": workflow})
    except BaseException:
      paths.remove(lock)
      raise
    results = paths.join(workdir, "results.json")
    if paths.exists(results):
      paths.remove(results)
  try:
    yield
  finally:
    if process_index == 0 and paths.exists(lock):
      paths.remove(lock)
