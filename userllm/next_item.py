"""The next-item task model: the item-sequence transformer built from a config,
its sharded initial state, its ranking function, and the evaluator of held-out
next items. Shared by the centralised (`next_item_workflow.py`) and federated
(`federated/tasks.py`) workflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data import sequences, splits
from data import timelines as tl
from infra import evaluation, mesh as mesh_lib, ranking, results, train_loop
from infra.errors import ConfigError
from userllm.models import sequence_model as sm

TASK = "next_item"


def build_model(model_config: ml_collections.ConfigDict, num_items: int,
                max_len: int) -> sm.ItemSequenceTransformer:
  """The transformer of `config.model` over items 1..num_items (0 = padding)."""
  cfg = sm.SequenceModelConfig.from_config(model_config, num_items + 1, max_len)
  if cfg.embed_dim % cfg.num_heads:
    raise ConfigError(f"config.model.embed_dim={cfg.embed_dim} must be a multiple "
                      f"of config.model.num_heads={cfg.num_heads}")
  return sm.ItemSequenceTransformer(cfg)


def init_state(model: sm.ItemSequenceTransformer, tx: optax.GradientTransformation,
               seed: int, mesh):
  """(state, shardings): the model's TrainState, initialised on `mesh`."""
  dummy = jnp.zeros((1, model.config.max_len), jnp.int32)
  init_params = lambda rng: model.init(rng, dummy)["params"]  # noqa: E731
  return train_loop.create_state(init_params, tx, jax.random.PRNGKey(seed), mesh)


def make_rank_fn(model: sm.ItemSequenceTransformer):
  """jitted (params, inputs [b, len], lengths [b], targets [b], excluded [b,
  vocab]) -> [b] rank of each target among the model's next-item scores."""

  @jax.jit
  def rank_fn(params, inputs, lengths, targets, excluded):
    states = model.apply({"params": params}, inputs, method=model.encode)
    last = jnp.take_along_axis(states, (lengths - 1)[:, None, None], axis=1)[:, 0]
    scores = model.apply({"params": params}, last, method=model.item_logits)
    return ranking.target_ranks(scores, targets, excluded)

  return rank_fn


class NextItemEvaluator:
  """Ranks every item for held-out next events (full ranking, seen items
  excluded): `evaluate(params)` gives `<split>/<scorer>/next_item/<metric>`
  for the model and for each fixed-score baseline (e.g. popularity)."""

  def __init__(self, timelines: tl.UserTimelines, held_out: splits.HeldOut,
               max_len: int, batch_size: int, mesh, rank_fn, split: str,
               baselines: dict[str, np.ndarray] | None = None):
    self.inputs, self.lengths = sequences.history_inputs(timelines, held_out,
                                                         max_len)
    self.histories = sequences.seen_items(timelines, held_out)
    self.targets = held_out.targets
    self.vocab = timelines.num_items + 1
    self.batch_size, self.mesh, self.rank_fn = batch_size, mesh, rank_fn
    self.split, self.baselines = split, baselines or {}

  def _batches(self, subset: np.ndarray | None = None):
    """Yields (inputs, lengths, targets, excluded, real) of fixed batch size,
    over every held-out row or over the rows `subset`."""
    subset = np.arange(len(self.targets)) if subset is None else subset
    for positions, real in evaluation.padded_rows(len(subset), self.batch_size):
      rows = subset[positions]
      excluded = sequences.excluded_items(
          [self.histories[r] for r in rows[:real]], len(rows), self.vocab)
      yield (self.inputs[rows], np.maximum(self.lengths[rows], 1),
             self.targets[rows], excluded,
             real)

  def ranks(self, params, subset: np.ndarray | None = None) -> np.ndarray:
    """[n] the model's rank of every held-out target (or of the rows `subset`)."""
    out = []
    for inputs, lengths, targets, excluded, real in self._batches(subset):
      batch = mesh_lib.put_batch((inputs, lengths, targets, excluded), self.mesh)
      out.append(mesh_lib.to_host(self.rank_fn(params, *batch))[:real])
    return np.concatenate(out)

  def fixed_score_ranks(self, scores: np.ndarray) -> np.ndarray:
    """[n] ranks under fixed item scores [vocab] that ignore the user."""
    out = []
    for _, _, targets, excluded, real in self._batches():
      tiled = np.broadcast_to(scores, excluded.shape)
      out.append(np.asarray(ranking.target_ranks(tiled, targets, excluded))[:real])
    return np.concatenate(out)

  def evaluate(self, params) -> dict[str, float]:
    out = results.prefixed(ranking.metrics_from_ranks(self.ranks(params)),
                           self.split, "model", TASK)
    for name, scores in self.baselines.items():
      out.update(results.prefixed(ranking.metrics_from_ranks(
          self.fixed_score_ranks(scores)), self.split, name, TASK))
    return out
