"""Using a finished workdir (`main.py --mode`, docs/using.md): the checks and
pieces every workflow's mode functions share.

- **A finished stage, never trained**: `restoring()` marks a run in which
  every stage must already be finished (`--mode=eval` runs the workflow's
  `run` inside it); each workflow calls `require_finished` as it starts a
  stage, so a stage whose latest checkpoint is short of its `num_steps` is a
  one-line WorkdirError naming the stage, before a step is taken (a change
  `infra/stages.fit` could absorb: it knows the stage and its schedule). `restore`
  is the same check followed by the restore itself, for the modes that read
  one stage's model without running the workflow.
- **Users**: `--users` names users by their ids in the data files
  (`UserTable.raw_ids`: the MovieLens `user id`; the synthetic generator
  numbers its users 1..N), the ids a reader of the data sees, never by our
  dense indices (those depend on which users a reader kept). An id the data
  does not hold is a one-line ConfigError naming it.
- **Outputs**: a mode's JSON goes to stdout (main.py) and to
  `<workdir>/use/<name>.json` (`save`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os

import numpy as np
import orbax.checkpoint as ocp

from data import timelines as tl
from infra import checkpoint, paths, results, workdir as workdir_lib
from infra.errors import ConfigError, WorkdirError

USE_DIR = "use"  # <workdir>/use/: what the modes write
_RESTORING = contextvars.ContextVar("restoring", default=False)


# --- finished stages ---------------------------------------------------------

@contextlib.contextmanager
def restoring():
  """Inside this block every stage a workflow fits must be finished already:
  `require_finished` raises instead of letting `fit` train."""
  token = _RESTORING.set(True)
  try:
    yield
  finally:
    _RESTORING.reset(token)


def committed_steps(directory: str) -> list[int]:
  """The steps saved whole in `<directory>/checkpoints` (none if absent)."""
  path = paths.join(directory, "checkpoints")
  return sorted(ocp.utils.checkpoint_steps(path)) if paths.isdir(path) else []


def check_finished(directory: str, num_steps: int, name: str, field: str) -> None:
  """A WorkdirError unless stage `name` (scheduled by `field`) has a
  checkpoint at `num_steps` or later in `<directory>/checkpoints`."""
  steps = committed_steps(directory)
  where = paths.join(directory, "checkpoints")
  if not steps:
    raise WorkdirError(
        f"stage {name} was never trained (no checkpoint in {where}); nothing "
        f"was trained now: train it first with --mode=train (the default)")
  if steps[-1] < num_steps:
    raise WorkdirError(
        f"stage {name} is not finished: its latest checkpoint is step "
        f"{steps[-1]} of {field}.num_steps={num_steps} ({where}); nothing was "
        f"trained now: finish it with --mode=train (the default)")


def require_finished(directory: str, schedule, name: str, field: str) -> None:
  """Under `restoring()`, `check_finished` for the stage `fit` is about to
  run in `directory` with `schedule` (its config section `field`); otherwise
  nothing (training finishes the stage)."""
  if _RESTORING.get():
    check_finished(directory, schedule.num_steps, name, field)


def restore(directory: str, schedule, identity: dict, state, name: str,
            field: str):
  """Stage `name`'s finished state from `<directory>/checkpoints`, restored
  into `state`'s structure and shardings after the identity check every
  resume makes (infra/checkpoint.py: a changed config is a WorkdirError)."""
  check_finished(directory, schedule.num_steps, name, field)
  ckpt = checkpoint.Checkpointer(directory, schedule.checkpoint_every,
                                 schedule.keep_checkpoints, identity)
  try:
    restored = ckpt.restore_or_keep(state)
  finally:
    ckpt.close()
  if int(restored.step) < schedule.num_steps:  # a damaged last step set aside
    check_finished(directory, schedule.num_steps, name, field)
    raise WorkdirError(f"stage {name}: restored step {int(restored.step)} of "
                       f"{schedule.num_steps} from {directory}")
  return restored


def check_workdir(workdir: str, workflow: str) -> None:
  """A WorkdirError unless `workdir` holds a run of `workflow` that no live
  process is training now (a mode reads its checkpoints)."""
  if not paths.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} does not exist: train a run there "
                       f"first (--mode=train, the default)")
  found = workdir_lib.owner(workdir)
  if found is None:
    raise WorkdirError(f"--workdir={workdir} holds no run (no "
                       f"{workdir_lib.OWNER}): train one there first "
                       f"(--mode=train, the default)")
  if found != workflow:
    raise WorkdirError(f"--workdir={workdir} holds a {found} run and this "
                       f"config's workflow is {workflow}: use a {found} config")
  lock = paths.join(workdir, workdir_lib.LOCK)
  holder = _read_json(lock) if paths.exists(lock) else None
  if holder is not None and _running(holder):
    raise WorkdirError(f"--workdir={workdir} is in use by process "
                       f"{holder.get('pid')} on {holder.get('host')} since "
                       f"{holder.get('since')} ({lock}); wait for that run to end")


def _read_json(path: str) -> dict:
  try:
    payload = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return {}
  return payload if isinstance(payload, dict) else {}


def _running(holder: dict) -> bool:
  """Whether the lock's process may still run: another host's, or a live
  process of this one (a lock left by a killed run is not)."""
  import socket
  pid = holder.get("pid")
  if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


# --- users ---------------------------------------------------------------------

def user_indices(timelines: tl.UserTimelines, users: list[str]) -> np.ndarray:
  """--users (ids of the data files, as strings) -> [n] dense user indices,
  in the order given, each once; a ConfigError names an id that is no integer
  or that the data does not hold."""
  if not users:
    raise ConfigError("--users is empty: name users by their ids in the data "
                      "files, e.g. --users=1,2")
  raw = timelines.users.raw_ids
  index = {int(r): i for i, r in enumerate(raw)}
  out = []
  for user in users:
    try:
      value = int(str(user).strip())
    except ValueError:
      raise ConfigError(f"--users: {user!r} is not a user id (an integer of the "
                        "data files)") from None
    if value not in index:
      raise ConfigError(
          f"--users: user id {value} is not in {timelines.source or timelines.name}"
          f" (its {len(raw)} users have ids {int(raw.min())}..{int(raw.max())}; "
          "ids are those of the data files, not row numbers)")
    out.append(index[value])
  return np.asarray(list(dict.fromkeys(out)), np.int64)


def item_index(timelines: tl.UserTimelines, item: int | None, flag: str) -> int:
  """An item id of the data files (`flag` names where it came from) -> its
  dense index; a ConfigError if the catalogue does not hold it."""
  raw = timelines.items.raw_ids[1:]
  found = np.nonzero(raw == item)[0] if item is not None else []
  if len(found) != 1:
    raise ConfigError(f"{flag}={item}: no such item id in "
                      f"{timelines.source or timelines.name} (its "
                      f"{len(raw)} items have ids {int(raw.min())}..{int(raw.max())})")
  return int(found[0]) + 1


def with_next_event(timelines: tl.UserTimelines, users: np.ndarray,
                    items: np.ndarray) -> tl.UserTimelines:
  """`timelines` with one more event after the last of each of `users` (distinct):
  item `items[i]`, rating 0, at the user's last time. A cut at a user's old
  length then shows the whole history and asks about that event (a task
  prompt that names the item at the cut: "Rating of <title>:")."""
  ends = timelines.user_offsets[users + 1]
  last = np.maximum(ends - 1, timelines.user_offsets[users])
  counts = np.bincount(users, minlength=timelines.num_users)
  offsets = np.concatenate([[0], np.cumsum(timelines.lengths + counts)])
  return dataclasses.replace(
      timelines, user_offsets=offsets.astype(np.int64),
      item_ids=np.insert(timelines.item_ids, ends, np.asarray(items, np.int32)),
      ratings=np.insert(timelines.ratings, ends, np.float32(0)),
      timestamps=np.insert(timelines.timestamps, ends, timelines.timestamps[last]))


def user_entry(timelines: tl.UserTimelines, user: int) -> dict:
  """What names a user in a mode's JSON: its data-file id, its dense index
  and how many events its history holds."""
  return {"user": int(timelines.users.raw_ids[user]), "index": int(user),
          "events": int(timelines.lengths[user])}


def item_entry(timelines: tl.UserTimelines, item: int) -> dict:
  return {"item": int(timelines.items.raw_ids[item]),
          "title": str(timelines.items.titles[item])}


def top_k(scores: np.ndarray, excluded: np.ndarray, k: int) -> tuple[np.ndarray,
                                                                     np.ndarray]:
  """(indices [k'], softmax probabilities [k']) of the k best of `scores` [c]
  outside `excluded` [c] bool, best first; the probabilities are over every
  candidate not excluded (k' = min(k, candidates left))."""
  masked = np.where(excluded, -np.inf, scores.astype(np.float64))
  order = np.argsort(-masked, kind="stable")[:min(k, int((~excluded).sum()))]
  kept = masked[~excluded]
  log_total = kept.max() + np.log(np.exp(kept - kept.max()).sum())
  return order, np.exp(masked[order] - log_total)


def save(workdir: str, name: str, payload: dict) -> str:
  """Writes `payload` to `<workdir>/use/<name>.json` (process 0); its path."""
  import jax
  path = paths.join(workdir, USE_DIR, f"{name}.json")
  if jax.process_index() == 0:
    results.write_json(path, payload)
  return path
