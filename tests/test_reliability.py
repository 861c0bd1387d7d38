"""Fault injection (issues 17, 40): a broken model never scores well, training
that goes non-finite stops (or skips) with the step named, federated rounds
drop non-finite clients, damaged state resumes from what is intact while a
state that does not fit stops the run, every step carries its config
identity, a refused save is one line with the earlier steps intact, SIGTERM
saves and resumes, a workdir is claimed by one run under one config, and
config values are checked by field."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from infra import checkpoint, config_checks, mesh as mesh_lib, ranking, train_loop
from infra import workdir as workdir_lib
from infra.errors import (USER_ERRORS, CheckpointError, ConfigError, DivergedError,
                          Preempted, WorkdirError)


# --- a broken model never ranks well ------------------------------------------

def test_nan_scores_rank_the_target_last():
  scores = jnp.array([[np.nan] * 6, [0.1, 0.9, np.nan, 0.2, 0.3, 0.0],
                      [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
  excluded = jnp.zeros((3, 6), bool).at[:, 0].set(True)  # padding
  ranks = np.asarray(ranking.target_ranks(scores, jnp.array([2, 1, 1]), excluded))
  # all NaN: last of the 4 other eligible; a NaN candidate outranks the target
  assert ranks.tolist() == [4, 1, 0]
  assert ranking.metrics_from_ranks(np.array([4, 4]), ks=(1,))["recall@1"] == 0.0
  inf_target = jnp.array([[0.0, 1.0, np.inf]])
  assert int(ranking.target_ranks(inf_target, jnp.array([2]),
                                  jnp.zeros((1, 3), bool))[0]) == 2


def test_nan_task_scores_answer_wrongly(tiny_timelines, tiny_tokenizer):
  from data import prompts, splits
  from userllm import evaluation
  split = splits.leave_last_out(tiny_timelines)
  builder = prompts.PromptBuilder(tiny_timelines, tiny_tokenizer, "text", 3,
                                  60, 40)
  examples = prompts.held_out_examples(split.test, "rating", 0, 0)
  evaluator = evaluation.TaskEvaluator(None, builder, examples, prompts.TASKS,
                                       "test", 4, 8, mesh=None)
  labels = evaluator.labels("rating")
  perfect = np.eye(5)[labels]
  perfect[0, :] = np.nan  # one broken row: wrong, and as far off as can be
  metrics = evaluator.task_metrics("rating", perfect)
  n = len(examples)
  assert metrics["accuracy"] == pytest.approx((n - 1) / n)
  assert metrics["mae"] == pytest.approx(max(labels[0], 4 - labels[0]) / n)
  for task in ("favourite_genre", "title_genre", "summary"):
    nan = np.full((1, len(builder.answers[task])), np.nan)
    assert evaluator.task_metrics(task, nan)["accuracy"] == 0.0
  titles = np.full((1, tiny_timelines.num_items + 1), np.nan)
  assert evaluator.task_metrics("next_title", titles)["recall@10"] == 0.0


# --- the train loop ----------------------------------------------------------

MESH_CONFIG = ml_collections.ConfigDict(dict(data=-1, model=1))


def _schedule(num_steps, **fields):
  schedule = common.schedule(num_steps=num_steps, log_every=1, eval_every=0,
                             checkpoint_every=2, eval_batch_size=8,
                             keep_checkpoints=5)
  schedule.update(fields)
  return schedule


def _batches(nan_at=()):
  """step -> a regression batch of 8 rows (NaN targets at `nan_at` steps)."""
  def batch(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = x @ np.arange(1, 5, dtype=np.float32)
    if step in nan_at:
      y[:] = np.nan
    return {"x": x, "y": y}
  return batch


def _fit(workdir, schedule, batch_fn, learning_rate=0.05, identity=None,
         params=lambda rng: {"w": jnp.zeros(4)}):
  mesh = mesh_lib.make_mesh(MESH_CONFIG)
  tx = optax.sgd(learning_rate)
  state, shardings = train_loop.create_state(params, tx, jax.random.PRNGKey(0), mesh)
  loss = lambda p, b, rng: (jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2), {})  # noqa: E731
  return train_loop.fit(state=state, state_shardings=shardings,
                        train_step=train_loop.make_train_step(loss, tx),
                        batch_fn=batch_fn, mesh=mesh, workdir=str(workdir),
                        schedule=schedule, identity=identity)


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_nonfinite_loss_stops_with_the_step_and_saves_nothing_after(tmp_path):
  with pytest.raises(DivergedError, match=r"step 4: training went non-finite "
                     r"\(.*loss=nan"):
    _fit(tmp_path, _schedule(6), _batches(nan_at={3}))
  saved = checkpoint.Checkpointer(str(tmp_path), 2, 5, {}).manager.all_steps()
  assert list(saved) == [2]  # the NaN step 4 was never saved


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path):
  state = _fit(tmp_path, _schedule(6, nonfinite="skip"), _batches(nan_at={1, 3}))
  assert np.isfinite(np.asarray(state.params["w"])).all()
  assert int(state.step) == 6
  skipped = [r.get("skipped_steps", 0) for r in _rows(tmp_path)]
  assert skipped == [0, 1, 0, 1, 0, 0]
  # a skipped step changes nothing: the same as a run whose NaN steps had no data
  reference = _fit(tmp_path / "ref", _schedule(6, nonfinite="skip"),
                   lambda s: _batches()(s) if s not in (1, 3) else {
                       "x": np.zeros((8, 4), np.float32), "y": np.zeros(8, np.float32)})
  np.testing.assert_allclose(state.params["w"], reference.params["w"], rtol=1e-6)


def test_a_run_that_never_changes_the_model_is_an_error(tmp_path):
  with pytest.raises(DivergedError, match="never changed"):
    _fit(tmp_path, _schedule(3), _batches(), learning_rate=0.0)


def test_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, capsys):
  straight = _fit(tmp_path / "straight", _schedule(8), _batches())
  damaged = tmp_path / "damaged"
  with pytest.raises(Preempted, match="stopped at step 6 of 8"):
    _fit(damaged, _schedule(8, stop_after_steps=6), _batches())  # saves 2, 4, 6
  latest = damaged / "checkpoints" / "6"
  for root, _, files in os.walk(latest):  # truncate every file of step 6
    for name in files:
      open(os.path.join(root, name), "w").close()
  (damaged / "checkpoints" / "7").mkdir()  # and an empty step directory
  with open(damaged / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "split": "tr')  # a row cut off by a kill
  resumed = _fit(damaged, _schedule(8), _batches())
  out = capsys.readouterr().out
  assert "step 7" in out and "step 6" in out and "cannot be restored" in out
  assert "resumed from" in out and "at step 4" in out
  assert "unreadable line" in out
  np.testing.assert_allclose(resumed.params["w"], straight.params["w"], rtol=1e-6)
  assert sorted(os.listdir(damaged / "damaged_checkpoints"))[0].startswith("6.")
  steps = [r["step"] for r in _rows(damaged)]
  assert steps == list(range(1, 9))  # every step once, nothing torn


def test_sigterm_saves_at_the_step_boundary_and_the_rerun_matches(tmp_path):
  straight = _fit(tmp_path / "straight", _schedule(7), _batches())
  plain = _batches()

  def killed_at_3(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return plain(step)

  with pytest.raises(Preempted, match="step 4"):
    _fit(tmp_path / "killed", _schedule(7), killed_at_3)
  saved = checkpoint.Checkpointer(str(tmp_path / "killed"), 2, 5, {}).manager
  assert saved.latest_step() == 4  # not a save step: saved because of SIGTERM
  resumed = _fit(tmp_path / "killed", _schedule(7), plain)
  np.testing.assert_allclose(resumed.params["w"], straight.params["w"], rtol=1e-6)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed


def test_the_host_runs_at_most_one_step_ahead_so_sigterm_is_prompt(tmp_path):
  """fit never queues more than two steps on the device: when batch_fn is
  asked for a batch, at most two steps' outputs are still being computed.
  (Unbounded, the host queued every step up to the next log when steps were
  slow, and a SIGTERM then waited for all of them before its save.)"""
  mesh = mesh_lib.make_mesh(MESH_CONFIG, jax.devices()[:1])  # no per-step sync
  queued = []

  def slow_loss(p, b, rng):  # a step the device takes longer over than the host
    work = jax.lax.fori_loop(0, 30, lambda i, y: jnp.tanh(y @ y),
                             jnp.full((192, 192), 0.01) + p["w"][0])
    return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2) + 0.0 * work[0, 0], {}

  def batch_fn(step):
    # the scalar outputs (step counter, metrics) of steps not finished yet
    queued.append(sum(a.shape == () and not a.is_ready() for a in jax.live_arrays()))
    return _batches()(step)

  tx = optax.sgd(0.05)
  state, shardings = train_loop.create_state(
      lambda rng: {"w": jnp.zeros(4)}, tx, jax.random.PRNGKey(0), mesh)
  train_loop.fit(state=state, state_shardings=shardings,
                 train_step=train_loop.make_train_step(slow_loss, tx),
                 batch_fn=batch_fn, mesh=mesh, workdir=str(tmp_path),
                 schedule=_schedule(16, log_every=16, checkpoint_every=16))
  one_step = queued[1]  # step 0 still running when step 1's batch is asked for
  assert one_step > 0, "the test's step must be slower than the host"
  assert max(queued) <= 2 * one_step, queued  # unbounded: it grew every step


def test_resume_under_a_changed_config_is_an_error(tmp_path):
  identity = {"seed": 0, "train": {"learning_rate": 0.05, "num_steps": 4}}
  with pytest.raises(Preempted):
    _fit(tmp_path, _schedule(4, stop_after_steps=2), _batches(), identity=identity)
  changed = {"seed": 1, "train": {"learning_rate": 0.5, "num_steps": 4}}
  with pytest.raises(WorkdirError, match=r"seed: 0 -> 1; train.learning_rate: "
                     r"0.05 -> 0.5"):
    _fit(tmp_path, _schedule(4), _batches(), identity=changed)
  longer = {"seed": 0, "train": {"learning_rate": 0.05, "num_steps": 6}}
  assert int(_fit(tmp_path, _schedule(6), _batches(), identity=longer).step) == 6


def _stopped_at(workdir, step, identity=None, **fit_args):
  """A run of `_fit` stopped at `step` (checkpoints every 2 steps)."""
  with pytest.raises(Preempted):
    _fit(workdir, _schedule(8, stop_after_steps=step), _batches(),
         identity=identity, **fit_args)


def _assert_one_user_line(error, *needles):
  """What main.py prints as `error: ...` and exit 2: one line with `needles`."""
  assert isinstance(error, USER_ERRORS), type(error)
  message = str(error)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, message


IDENTITY = {"seed": 0, "train": {"learning_rate": 0.05, "dims": (4,)}}


def test_the_identity_is_saved_inside_every_step_and_cannot_be_lost(tmp_path):
  _stopped_at(tmp_path, 4, identity=IDENTITY)
  directory = tmp_path / "checkpoints"
  manager = checkpoint.Checkpointer(str(tmp_path), 2, 5, IDENTITY).manager
  for step in (2, 4):  # orbax's own reader sees it, as JSON stores it
    assert manager.metadata(step).custom_metadata["identity"] == {
        "seed": 0, "train": {"learning_rate": 0.05, "dims": [4]}}
  # nothing beside the steps holds it (at 23798f5 deleting identity.json
  # resumed under any config without a word)
  assert sorted(os.listdir(directory)) == ["2", "4"]
  changed = {"seed": 0, "train": {"learning_rate": 0.5, "dims": (4,)}}
  with pytest.raises(WorkdirError, match=r"train.learning_rate: 0.05 -> 0.5"):
    _fit(tmp_path, _schedule(8), _batches(), identity=changed)
  assert int(_fit(tmp_path, _schedule(8), _batches(), identity=IDENTITY).step) == 8


@pytest.mark.parametrize("damage,why", [
    ("cut", "cannot be read (JSONDecodeError"), ("remove", "is missing")])
def test_a_step_whose_identity_cannot_be_read_is_not_resumed(tmp_path, damage, why):
  _stopped_at(tmp_path, 4, identity=IDENTITY)
  step_dir = tmp_path / "checkpoints" / "4"
  metadata = step_dir / checkpoint.STEP_METADATA_FILE
  if damage == "cut":
    metadata.write_text(metadata.read_text()[:40])
  else:
    metadata.unlink()
  with pytest.raises(CheckpointError) as error:
    _fit(tmp_path, _schedule(8), _batches(), identity=IDENTITY)
  _assert_one_user_line(error.value, f"step 4 in {tmp_path / 'checkpoints'} cannot "
                        f"be checked", f"{metadata} {why}", f"Move {step_dir} out")
  assert step_dir.is_dir()  # nothing moved, nothing trained
  shutil.move(step_dir, tmp_path / "aside")  # what the message says to do
  straight = _fit(tmp_path / "straight", _schedule(8), _batches())
  resumed = _fit(tmp_path, _schedule(8), _batches(), identity=IDENTITY)
  np.testing.assert_allclose(resumed.params["w"], straight.params["w"], rtol=1e-6)


@pytest.mark.parametrize("legacy", ["matching", "changed", "absent"])
def test_a_step_written_before_identities_moved_in_uses_identity_json(
    tmp_path, capsys, legacy):
  """Steps saved before this change carry no identity: their run's
  checkpoints/identity.json checks them, and without it they are an error."""
  _stopped_at(tmp_path, 4, identity=IDENTITY)
  directory = tmp_path / "checkpoints"
  for step in (2, 4):  # as the earlier code wrote them
    path = directory / str(step) / checkpoint.STEP_METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["custom_metadata"] = {}
    path.write_text(json.dumps(metadata))
  if legacy != "absent":
    old = dict(IDENTITY, seed=0 if legacy == "matching" else 7)
    (directory / "identity.json").write_text(json.dumps(old))
  if legacy == "matching":
    assert int(_fit(tmp_path, _schedule(8), _batches(), identity=IDENTITY).step) == 8
    assert "step 4 carries no config identity" in capsys.readouterr().out
    return
  error_type = WorkdirError if legacy == "changed" else CheckpointError
  with pytest.raises(error_type) as error:
    _fit(tmp_path, _schedule(8), _batches(), identity=IDENTITY)
  needles = (["was trained under another config (seed: 7 -> 0)"]
             if legacy == "changed" else
             ["has no 'identity' entry", f"{directory}/identity.json does not exist"])
  _assert_one_user_line(error.value, *needles)


def test_a_field_added_since_a_run_matches_only_at_its_old_behaviour():
  """Steps saved before llm.remat / rl.lora_rank existed resume under a
  config that holds their old behaviour there; not under another value."""
  saved = {"llm": {"dtype": "float32"}, "rl": {"kl_coef": 0.005}}
  now = {"llm": {"dtype": "float32", "remat": True},
         "rl": {"kl_coef": 0.005, "lora_rank": 0, "lora_alpha": 16.0}}
  assert checkpoint.changed_fields(saved, now) == []  # remat: a compute switch
  now["rl"]["lora_rank"] = 8
  assert checkpoint.changed_fields(saved, now) == ["rl.lora_rank: '<absent>' -> 8"]


@pytest.mark.parametrize("change,cause", [
    ("tree", "tree structures do not match"),
    ("shape", "is not compatible with the stored shape"),
    ("code", "TypeError: a bug in restoring")])
def test_a_state_that_does_not_fit_its_checkpoint_stops_the_run(
    tmp_path, monkeypatch, change, cause):
  """Only torn files are set aside: a checkpoint whose files read whole but
  do not fit the state (a model or code change the identity misses) stops
  the run, and it never starts over beside its checkpoints."""
  _stopped_at(tmp_path, 4)
  params = {"tree": lambda rng: {"w": jnp.zeros(4), "b": jnp.zeros(2)},
            "shape": lambda rng: {"w": jnp.zeros(5)},
            "code": lambda rng: {"w": jnp.zeros(4)}}[change]
  if change == "code":  # a bug on our side of a restore with a target
    restore = checkpoint.ocp.CheckpointManager.restore

    def buggy_restore(manager, step, args=None, **kwargs):
      if args is not None and args.item is not None:
        raise TypeError("a bug in restoring")
      return restore(manager, step, args=args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", buggy_restore)
  with pytest.raises(CheckpointError) as error:
    _fit(tmp_path, _schedule(8), _batches(), params=params)
  _assert_one_user_line(error.value, f"step 4 in {tmp_path / 'checkpoints'} cannot "
                        "be restored into this run's state", cause,
                        "its files read whole, so it is left in place")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert not (tmp_path / "damaged_checkpoints").exists()


def _refuse_array_writes(monkeypatch, error):
  """Every array write of a save raises `error`, as TensorStore does when the
  disk refuses it (a full tmpfs gave exactly this RESOURCE_EXHAUSTED text)."""
  from orbax.checkpoint._src.serialization import serialization

  async def refused(*args, **kwargs):
    raise error

  monkeypatch.setattr(serialization, "async_serialize_from_host", refused)


FULL_DISK = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file '
    '"/w/checkpoints/4.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/": '
    "Failed writing: [OS error 28: No space left on device]")


@pytest.mark.parametrize("error,needles", [
    (FULL_DISK, ["out of space saving a checkpoint to", "are free there"]),
    (OSError(errno.ENOSPC, "No space left on device"),
     ["out of space saving a checkpoint to", "are free there"]),
    (OSError(errno.EACCES, "Permission denied"),
     ["cannot save a checkpoint to", "PermissionError: [Errno 13] Permission denied"])])
def test_a_refused_save_is_one_line_and_keeps_the_saved_steps(
    tmp_path, monkeypatch, error, needles):
  _stopped_at(tmp_path, 2)
  with monkeypatch.context() as patch:
    _refuse_array_writes(patch, error)
    with pytest.raises(CheckpointError) as raised:
      _fit(tmp_path, _schedule(8), _batches())
  # the state: w [4] float32, step int32, rng [2] uint32
  _assert_one_user_line(raised.value, *needles, str(tmp_path / "checkpoints"),
                        "a checkpoint of this run needs about 28 bytes",
                        "intact (latest: step 2), and the same command resumes")
  assert checkpoint.Checkpointer(str(tmp_path), 2, 5, {}).manager.all_steps() == [2]
  straight = _fit(tmp_path / "straight", _schedule(8), _batches())
  resumed = _fit(tmp_path, _schedule(8), _batches())
  np.testing.assert_allclose(resumed.params["w"], straight.params["w"], rtol=1e-6)
  assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]


_TMPFS_RUN = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import jax, jax.numpy as jnp, numpy as np, optax
import test_reliability as t
from infra import checkpoint, mesh as mesh_lib, train_loop
from infra.errors import CheckpointError

def params(rng):  # 240 kB of random floats: orbax's zstd cannot shrink them
  return {{"w": jax.random.normal(rng, (60_000,))}}

def batch(step):
  rng = np.random.default_rng(step)
  return {{"x": rng.normal(size=(8, 60_000)).astype(np.float32) / 245.0,
          "y": rng.normal(size=8).astype(np.float32)}}

try:
  t._fit({workdir!r}, t._schedule(8), batch, params=params)
  print(json.dumps({{"error": None}}))
except CheckpointError as e:
  kept = checkpoint.Checkpointer({workdir!r}, 2, 5, {{}})
  state, _ = train_loop.create_state(params, optax.sgd(0.05), jax.random.PRNGKey(0),
                                     mesh_lib.make_mesh(t.MESH_CONFIG))
  restored = kept.restore_or_keep(state)
  print(json.dumps({{"error": str(e), "steps": kept.manager.all_steps(),
                    "restored": int(restored.step)}}))
"""


def _private_mounts_allowed() -> bool:
  if not shutil.which("unshare"):
    return False
  return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _private_mounts_allowed(),
                    reason="needs `unshare -m` (root or user namespaces) for a tmpfs")
def test_a_full_tmpfs_refuses_a_save_in_one_line(tmp_path):
  """The real thing: `<workdir>/checkpoints` on a 600 kB tmpfs, in a private
  mount namespace, fills up at the third save of a 240 kB state (the rest of
  the workdir is on the ordinary disk)."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  tests = os.path.dirname(os.path.abspath(__file__))
  script = _TMPFS_RUN.format(repo=os.path.dirname(tests), tests=tests,
                             workdir=str(workdir))
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "device_count=8", "device_count=1"))
  run = subprocess.run(
      ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=600k tmpfs "
       f'{workdir / "checkpoints"} && exec "{sys.executable}" -c "$0"', script],
      capture_output=True, text=True, timeout=300, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  # orbax's logged tracebacks of the refused writes are left out: one line
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["error"] and "\n" not in result["error"], result
  assert result["error"].startswith(
      f"out of space saving a checkpoint to {workdir / 'checkpoints'}: a "
      "checkpoint of this run needs about 240.0 kB"), result
  assert result["steps"] and result["restored"] == max(result["steps"])
  assert f"intact (latest: step {max(result['steps'])})" in result["error"]


def test_a_warmup_longer_than_the_run_is_said_at_start(tmp_path, capsys):
  _fit(tmp_path / "long", _schedule(4, warmup_steps=10), _batches())
  out = capsys.readouterr().out
  assert ("[train] note: config.train.warmup_steps=10 is not shorter than "
          "config.train.num_steps=4: the learning rate warms up over 3 step(s) "
          "instead") in out
  _fit(tmp_path / "short", _schedule(4, warmup_steps=3), _batches())
  assert "note:" not in capsys.readouterr().out


# --- the workdir ---------------------------------------------------------------

def test_one_run_per_workdir_and_no_stale_results(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  with workdir_lib.claim(str(tmp_path), process_index=0):
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(WorkdirError, match=f"in use by process {os.getpid()}"):
      with workdir_lib.claim(str(tmp_path), process_index=0):
        pass
  assert not (tmp_path / workdir_lib.LOCK).exists()
  # a lock left by a process that is gone is taken over
  (tmp_path / workdir_lib.LOCK).write_text(json.dumps(
      {"pid": 2 ** 22 + 12345, "host": os.uname().nodename, "since": "then"}))
  with workdir_lib.claim(str(tmp_path), process_index=0):
    pass
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(WorkdirError, match="is a file"):
    with workdir_lib.claim(str(afile), process_index=0):
      pass


# --- config values -------------------------------------------------------------

@pytest.mark.parametrize("field,value,why", [
    ("train.batch_size", 0, ">= 1"), ("train.log_every", -5, ">= 1"),
    ("train.num_steps", -1, ">= 1"), ("seed", -1, ">= 0"),
    ("model.dropout", 1.0, r"in \[0, 1\)"), ("data.max_len", 0, ">= 1"),
    ("train.learning_rate", float("nan"), "finite"),
    ("train.eval_batch_size", 0, ">= 1")])
def test_config_values_are_checked_by_field(tiny_config, field, value, why):
  section, name = field.rsplit(".", 1) if "." in field else ("", field)
  (tiny_config[section] if section else tiny_config)[name] = value
  with pytest.raises(ConfigError, match=rf"^config\.{field}={value!r} must be {why}"):
    config_checks.check_config(tiny_config)
