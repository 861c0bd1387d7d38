"""The one training loop: sharded state creation, a jitted step, and `fit`.

A step is `step(state, batch) -> (state, metrics)`, jitted once with in/out
shardings. `fit` resumes from the workdir's latest checkpoint, runs the remaining
steps, logs JSON lines + TensorBoard + a progress line, evaluates periodically and
checkpoints. Batches come from `batch_fn(step)`, a pure function of the step, so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import datetime
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from infra import checkpoint, mesh as mesh_lib, metric_writer
from infra.errors import ConfigError, DivergedError, Preempted
from infra.train_state import TrainState

PyTree = Any


def init_sharded(boxed_state: Callable[[], PyTree], mesh: Mesh):
  """Builds a state directly into its shardings.

  Args:
    boxed_state: () -> state pytree whose leaves may be boxed with logical axis
      names (nn.LogicallyPartitioned); evaluated abstractly for the shardings,
      then once under jit straight into them.
    mesh: the device mesh.

  Returns:
    (state, state_shardings): unboxed state laid out on the mesh.
  """
  shardings = mesh_lib.logical_shardings(jax.eval_shape(boxed_state), mesh)
  init_state = jax.jit(lambda: nn.meta.unbox(boxed_state()),
                       out_shardings=shardings)
  return init_state(), shardings


def create_state(init_params: Callable[[jax.Array], PyTree],
                 tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh):
  """Initialises a TrainState directly into its shardings.

  Args:
    init_params: rng -> parameters, possibly boxed with logical axis names.
    tx: the optax optimiser.
    rng: PRNG key; split into the init key and the state's training key.
    mesh: the device mesh.

  Returns:
    (state, state_shardings): unboxed state laid out on the mesh.
  """
  init_rng, train_rng = jax.random.split(rng)

  def init_boxed_state():
    params = init_params(init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=train_rng)

  return init_sharded(init_boxed_state, mesh)


def place_state(params: PyTree, boxed_params: PyTree,
                tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh):
  """A TrainState of given `params` (host or device arrays, e.g. stages
  trained before), laid out by the logical axes of `boxed_params` (a tree of
  the same structure whose leaves are boxed with logical axis names: e.g.
  `jax.eval_shape` of the models' init), its optimiser state made on device
  in the matching shardings. The rng is split as `create_state` splits it.

  Returns (state, state_shardings), as `create_state`.
  """
  _, train_rng = jax.random.split(rng)

  def state_of(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=train_rng)

  shardings = mesh_lib.logical_shardings(jax.eval_shape(state_of, boxed_params),
                                         mesh)
  params = jax.device_put(nn.meta.unbox(params), shardings.params)
  return jax.jit(state_of, out_shardings=shardings)(params), shardings


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation):
  """Wraps `loss_fn(params, batch, rng) -> (loss, metrics)` into a train step."""

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics

  return train_step


SCHEDULE_MINIMA = {"num_steps": 1, "log_every": 1, "eval_every": 0,
                   "checkpoint_every": 1, "keep_checkpoints": 1,
                   "stop_after_steps": 0}
NONFINITE = ("error", "skip")  # schedule.nonfinite: what a non-finite step does


def check_schedule(schedule: ml_collections.ConfigDict, field: str) -> None:
  """One-line errors for schedule values `fit` cannot run with."""
  for name, minimum in SCHEDULE_MINIMA.items():
    value = schedule[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConfigError(f"{field}.{name}={value!r} must be an integer >= {minimum}")
  if schedule.nonfinite not in NONFINITE:
    raise ConfigError(f"{field}.nonfinite={schedule.nonfinite!r} is not one of "
                      f"{NONFINITE}")


def note_bent_warmup(schedule: ml_collections.ConfigDict, name: str,
                     field: str) -> None:
  """Prints one line when the optimiser's warm-up is shorter than configured.

  `infra.optim.make_optimizer` warms up over at most `num_steps - 1` steps, so
  a run as short as its warm-up still has a step at the full learning rate.
  That is a note, not an error: a short run of a long config (a smoke test,
  `--config.train.num_steps=3`) is meant, and changing num_steps on resume is
  allowed. Schedules without `warmup_steps` (federated rounds) are silent."""
  warmup, num_steps = schedule.get("warmup_steps"), schedule.num_steps
  if warmup is None or warmup <= max(num_steps - 1, 0):
    return
  print(f"[{name}] note: {field}.warmup_steps={warmup} is not shorter than "
        f"{field}.num_steps={num_steps}: the learning rate warms up over "
        f"{max(num_steps - 1, 0)} step(s) instead and reaches "
        f"{field}.learning_rate at the last", flush=True)


def guard_step(train_step: Callable, skip_nonfinite: bool) -> Callable:
  """`train_step` plus two metrics: `update_norm` (|new params - old params|)
  and `nonfinite` (1 when a metric or the update is not finite). With
  `skip_nonfinite` such a step keeps the old state (only the step count
  advances, so the batch schedule stays the same)."""

  def step(state, batch):
    new_state, metrics = train_step(state, batch)
    update_norm = optax.tree.norm(
        jax.tree.map(jnp.subtract, new_state.params, state.params))
    finite = jnp.isfinite(update_norm)
    for value in jax.tree.leaves(metrics):
      finite &= jnp.all(jnp.isfinite(value))
    if skip_nonfinite:
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                          new_state, state)
      new_state = kept.replace(step=new_state.step)
    return new_state, {**metrics, "update_norm": update_norm,
                       "nonfinite": 1.0 - finite.astype(jnp.float32)}

  return step


class _SigtermFlag:
  """Turns SIGTERM (what TPU VMs and Colab send before they take the machine)
  into a flag `fit` reads at the next step boundary, while installed. Only
  single-process runs install it: multi-host runs get the same notice from
  JAX's preemption service (`CheckpointManager.reached_preemption`)."""

  def __init__(self):
    self.raised, self._previous = False, None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def cpu_collectives_can_deadlock(mesh: Mesh) -> bool:
  """Whether steps must not queue up on this mesh: XLA:CPU's client (jaxlib
  0.10) deadlocks now and then when several steps with collectives are in
  flight over several CPU devices. The client's threads then all hold later
  steps' executions waiting for their inputs, while an earlier step's all-reduce
  waits for participants that get no thread. After 40 s the rendezvous aborts
  the process ("Fatal Python error: Aborted", no message): 2 of 7 300-step
  runs on 8 fake devices with the other core busy, 0 of 15 once fit waited
  for each step. Accelerators and one-device meshes are not affected."""
  return mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"


def fit(*, state: TrainState, state_shardings, train_step: Callable,
        batch_fn: Callable[[int], Any], mesh: Mesh, workdir: str,
        schedule: ml_collections.ConfigDict,
        eval_fn: Callable[[TrainState], dict] | None = None,
        name: str = "train", unit: str = "step",
        schedule_field: str = "config.train", identity: dict | None = None
        ) -> TrainState:
  """Trains to `schedule.num_steps`, resuming from `workdir`'s checkpoint if any.

  `schedule` is the stage's train section of the config; fit reads
  `num_steps, log_every, eval_every, checkpoint_every, keep_checkpoints,
  stop_after_steps, nonfinite`. `stop_after_steps` > 0 stops (and checkpoints)
  at that step as if preempted (raising Preempted: nothing is evaluated or
  reported of a partly trained model), leaving the schedule of a `num_steps`
  run intact; a rerun resumes from there. `eval_fn(state) -> {key: value}` runs
  every `eval_every` steps (0: never). `unit` names a step in the progress
  lines (a federated step is a "round"); `schedule_field` names the schedule
  in errors and notes. `identity` (the config values that define this stage)
  is saved inside every checkpoint; resuming under other values is a
  WorkdirError (infra/checkpoint.py says what else a resume checks). A
  warm-up the optimiser shortens is said in one line at start.

  Safety: a step whose loss, metrics or update is not finite stops the run
  with a DivergedError naming the step (no checkpoint holds it), or with
  `nonfinite="skip"` leaves the state as it was (counted as `skipped_steps`).
  A run whose steps never changed the parameters is a DivergedError too.
  SIGTERM saves a checkpoint at the next step boundary and raises Preempted;
  so does reaching `stop_after_steps` (with `requested=True`).
  """
  check_schedule(schedule, schedule_field)
  num_steps, log_every = schedule.num_steps, schedule.log_every
  eval_every = schedule.eval_every if eval_fn is not None else 0
  note_bent_warmup(schedule, name, schedule_field)
  ckpt = checkpoint.Checkpointer(workdir, schedule.checkpoint_every,
                                 schedule.keep_checkpoints, identity or {})
  state = ckpt.restore_or_keep(state)
  start = int(state.step)
  writer = metric_writer.MetricWriter(workdir, resume_step=start)
  if start:
    print(f"[{name}] resumed from {ckpt.directory} at {unit} {start}", flush=True)
  data_sharding = mesh_lib.batch_sharding(mesh)
  step_fn = jax.jit(guard_step(train_step, schedule.nonfinite == "skip"),
                    in_shardings=(state_shardings, data_sharding),
                    out_shardings=(state_shardings, None), donate_argnums=0)
  # Steps queued on the device ahead of the host: one on multi-device CPU
  # meshes (cpu_collectives_can_deadlock), two elsewhere, so the host prepares
  # the next batch while a step runs but never queues more. Unbounded, the host
  # ran up to log_every steps ahead, and a SIGTERM (a TPU VM's preemption
  # notice gives about 30 s) waited for all of them before the save.
  max_in_flight = 1 if cpu_collectives_can_deadlock(mesh) else 2
  progress = _Progress(name, unit, start, num_steps)
  stop_after = schedule.stop_after_steps
  stop = min(num_steps, stop_after) if stop_after > 0 else num_steps
  pending, window = [], []  # device metrics not yet fetched; fetched, not logged
  changed = False
  try:
    with _SigtermFlag() as sigterm:
      for step in range(start, stop):
        batch = mesh_lib.put_batch(batch_fn(step), mesh)
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        if len(pending) >= max_in_flight:
          jax.block_until_ready(pending[-max_in_flight])
        done = step + 1
        log_due = done % log_every == 0 or done == stop
        preempted = sigterm.raised or ckpt.manager.reached_preemption(done)
        if log_due or ckpt.save_due(done, done == stop) or preempted:
          # no host sync every step: fetch at logs and saves, and check them
          fetched = jax.device_get(pending)
          pending = []
          changed |= _check_steps(fetched, done, name, unit, schedule_field,
                                  schedule.nonfinite)
          window += fetched
        if log_due and window:
          means = _window_means(window)
          window = []
          writer.write(done, name, means)
          progress.report(done, means)
        if eval_every and (done % eval_every == 0 or done == stop):
          eval_metrics = eval_fn(state)
          writer.write(done, "valid", eval_metrics)
          print(f"[{name}] {unit} {done} valid " + _format(eval_metrics), flush=True)
        ckpt.maybe_save(done, state, is_last=done == stop or preempted)
        if preempted:
          ckpt.close()  # wait for the save before saying it is there
          print(f"[{name}] preempted (SIGTERM): saved a checkpoint at {unit} {done} in "
                f"{ckpt.directory}; rerun the same command to resume", flush=True)
          raise Preempted(f"preempted at {unit} {done}")
    if stop < num_steps:  # stop_after_steps: saved above; no results of a part
      raise Preempted(f"[{name}] stopped at {unit} {stop} of {num_steps} "
                      f"({schedule_field}.stop_after_steps={stop_after})",
                      requested=True)
    if stop > start and not changed:
      raise DivergedError(
          f"[{name}] {stop - start} {unit}(s) ran but the parameters never changed "
          f"(every update was zero or skipped: e.g. a learning rate of 0, or no "
          f"client finished a {unit}); no results are reported")
  finally:
    ckpt.close()
    writer.close()
  return state


def _check_steps(fetched: list[dict], last: int, name: str, unit: str,
                 field: str, nonfinite: str) -> bool:
  """Raises DivergedError at the first non-finite step of `fetched` (the
  metrics of the steps ending at `last`) unless they are skipped; returns
  whether any step changed the parameters."""
  first = last - len(fetched) + 1
  for offset, metrics in enumerate(fetched):
    if metrics["nonfinite"] and nonfinite == "error":
      bad = {k: float(v) for k, v in metrics.items()
             if np.size(v) == 1 and not np.isfinite(v)}
      raise DivergedError(
          f"[{name}] {unit} {first + offset}: training went non-finite "
          f"({_format(bad)}); nothing after the last checkpoint was saved. Lower "
          f"the learning rate, or set {field}.nonfinite='skip' to skip such steps")
  return any(not m["nonfinite"] and m["update_norm"] > 0 for m in fetched)


def _window_means(window: list[dict]) -> dict[str, float]:
  """Means over the finite steps of a log window, and how many were skipped."""
  kept = [m for m in window if not m["nonfinite"]]
  means = {k: float(np.mean([m[k] for m in kept])) for k in window[0]
           if k != "nonfinite"} if kept else {}
  skipped = len(window) - len(kept)
  return {**means, "skipped_steps": float(skipped)} if skipped else means


class _Progress:
  """Prints `step i/n, metrics, steps/s and ETA` lines."""

  def __init__(self, name: str, unit: str, start: int, total: int):
    self.name, self.unit, self.start, self.total = name, unit, start, total
    self.began = time.time()

  def report(self, step: int, metrics: dict) -> None:
    elapsed = time.time() - self.began
    rate = (step - self.start) / max(elapsed, 1e-9)
    eta = datetime.timedelta(seconds=int((self.total - step) / max(rate, 1e-9)))
    print(f"[{self.name}] {self.unit} {step}/{self.total} {_format(metrics)} | "
          f"{rate:.2f} {self.unit}s/s | ETA {eta}", flush=True)


def _format(metrics: dict) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def step_seconds(train_step: Callable, state, batch, repeats: int = 10) -> float:
  """Median wall time of one jitted `train_step(state, batch)` (compiled and
  warmed up first); the caller's state is not donated, so its training is not
  affected. The one step-time measurement of workflows and benchmarks."""
  step = jax.jit(train_step)  # no donation
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - began)
  return float(np.median(times))
