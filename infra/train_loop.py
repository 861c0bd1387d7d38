"""The one training loop: sharded state creation, a jitted step, and `fit`.

A step is `step(state, batch) -> (state, metrics)`, jitted once with in/out
shardings. `fit` resumes from the workdir's latest checkpoint, runs the remaining
steps, logs JSON lines + TensorBoard + a progress line, evaluates periodically and
checkpoints. Batches come from `batch_fn(step)`, a pure function of the step, so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import datetime
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
from infra.errors import ConfigError
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


def check_schedule(schedule: ml_collections.ConfigDict, field: str) -> None:
  """One-line errors for schedule values `fit` cannot run with."""
  for name, minimum in SCHEDULE_MINIMA.items():
    value = schedule[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConfigError(f"{field}.{name}={value!r} must be an integer >= {minimum}")


def fit(*, state: TrainState, state_shardings, train_step: Callable,
        batch_fn: Callable[[int], Any], mesh: Mesh, workdir: str,
        schedule: ml_collections.ConfigDict,
        eval_fn: Callable[[TrainState], dict] | None = None,
        name: str = "train", unit: str = "step",
        schedule_field: str = "config.train") -> TrainState:
  """Trains to `schedule.num_steps`, resuming from `workdir`'s checkpoint if any.

  `schedule` is the stage's train section of the config; fit reads
  `num_steps, log_every, eval_every, checkpoint_every, keep_checkpoints,
  stop_after_steps`. `stop_after_steps` > 0 stops (and checkpoints) at that
  step as if preempted, leaving the schedule of a `num_steps` run intact; a
  rerun resumes from there. `eval_fn(state) -> {key: value}` runs every
  `eval_every` steps (0: never). `unit` names a step in the progress lines
  (a federated step is a "round"); `schedule_field` names the schedule in errors.
  """
  check_schedule(schedule, schedule_field)
  num_steps, log_every = schedule.num_steps, schedule.log_every
  eval_every = schedule.eval_every if eval_fn is not None else 0
  ckpt = checkpoint.Checkpointer(workdir, schedule.checkpoint_every,
                                 schedule.keep_checkpoints)
  state = ckpt.restore_or_keep(state)
  start = int(state.step)
  writer = metric_writer.MetricWriter(workdir, resume_step=start)
  if start:
    print(f"[{name}] resumed from {ckpt.directory} at {unit} {start}", flush=True)
  data_sharding = mesh_lib.batch_sharding(mesh)
  step_fn = jax.jit(train_step, in_shardings=(state_shardings, data_sharding),
                    out_shardings=(state_shardings, None), donate_argnums=0)
  progress = _Progress(name, unit, start, num_steps)
  stop_after = schedule.stop_after_steps
  stop = min(num_steps, stop_after) if stop_after > 0 else num_steps
  pending = []  # device metrics not yet fetched: no host sync every step
  for step in range(start, stop):
    batch = mesh_lib.put_batch(batch_fn(step), mesh)
    state, metrics = step_fn(state, batch)
    pending.append(metrics)
    done = step + 1
    if done % log_every == 0 or done == stop:
      means = jax.tree.map(lambda *xs: float(jnp.mean(jnp.stack(xs))), *pending)
      pending = []
      writer.write(done, name, means)
      progress.report(done, means)
    if eval_every and (done % eval_every == 0 or done == stop):
      eval_metrics = eval_fn(state)
      writer.write(done, "valid", eval_metrics)
      print(f"[{name}] {unit} {done} valid " + _format(eval_metrics), flush=True)
    ckpt.maybe_save(done, state, is_last=done == stop)
  ckpt.close()
  writer.close()
  return state


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
