"""Workflow `next_item`: train the item-sequence transformer on user timelines and
evaluate full-ranking Recall@K / NDCG@K on each user's held-out last item, with a
popularity baseline computed on the same held-out events.

Split: leave-last-out per user (valid = second-to-last event, test = last).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data import sequences, sources, splits
from infra import mesh as mesh_lib, ranking, train_loop
from infra.errors import ConfigError
from userllm import sequence_model as sm


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay, global-norm clipping."""
  # a warm-up as long as the run (a short test run) still leaves a decay step
  warmup = min(train.warmup_steps, max(train.num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, train.learning_rate, warmup, max(train.num_steps, warmup + 1))
  return optax.chain(optax.clip_by_global_norm(train.grad_clip),
                     optax.adamw(schedule, weight_decay=train.weight_decay))


def build_model(config, vocab_size: int) -> sm.ItemSequenceTransformer:
  cfg = sm.SequenceModelConfig.from_config(config.model, vocab_size,
                                           config.data.max_len)
  if cfg.embed_dim % cfg.num_heads:
    raise ConfigError(f"config.model.embed_dim={cfg.embed_dim} must be a multiple "
                      f"of config.model.num_heads={cfg.num_heads}")
  return sm.ItemSequenceTransformer(cfg)


def init_state(model, tx, config, mesh):
  """(state, shardings) for the model's TrainState on `mesh`."""
  dummy = jnp.zeros((1, config.data.max_len), jnp.int32)
  init_params = lambda rng: model.init(rng, dummy)["params"]  # noqa: E731
  return train_loop.create_state(init_params, tx,
                                 jax.random.PRNGKey(config.seed), mesh)


class RankingEvaluator:
  """Scores held-out events by a model (or fixed scores) in fixed-size batches."""

  def __init__(self, timelines, held_out: splits.HeldOut, max_len: int,
               batch_size: int, mesh):
    self.inputs, self.lengths = sequences.history_inputs(timelines, held_out,
                                                         max_len)
    self.histories = sequences.seen_items(timelines, held_out)
    self.targets = held_out.targets
    self.vocab = timelines.num_items + 1
    self.batch_size, self.mesh = batch_size, mesh

  def _batches(self):
    """Yields (inputs, lengths, targets, seen, num_real) padded to batch_size."""
    n, b = len(self.targets), self.batch_size
    for start in range(0, n, b):
      stop = min(start + b, n)
      pad = b - (stop - start)
      take = lambda a: np.pad(a[start:stop], [(0, pad)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
      seen = ranking.seen_mask(self.histories[start:stop], b, self.vocab)
      lengths = np.maximum(take(self.lengths), 1)  # padded rows read position 0
      yield take(self.inputs), lengths, take(self.targets), seen, stop - start

  def model_ranks(self, rank_fn, params) -> np.ndarray:
    ranks = []
    for inputs, lengths, targets, seen, real in self._batches():
      batch = mesh_lib.put_batch((inputs, lengths, targets, seen), self.mesh)
      ranks.append(np.asarray(rank_fn(params, *batch))[:real])
    return np.concatenate(ranks)

  def fixed_score_ranks(self, scores: np.ndarray) -> np.ndarray:
    ranks = []
    for _, _, targets, seen, real in self._batches():
      tiled = np.broadcast_to(scores, seen.shape)
      ranks.append(np.asarray(ranking.target_ranks(tiled, targets, seen))[:real])
    return np.concatenate(ranks)


def make_rank_fn(model):
  @jax.jit
  def rank_fn(params, inputs, lengths, targets, seen):
    states = model.apply({"params": params}, inputs, method=model.encode)
    last = jnp.take_along_axis(states, (lengths - 1)[:, None, None], axis=1)[:, 0]
    scores = model.apply({"params": params}, last, method=model.item_logits)
    return ranking.target_ranks(scores, targets, seen)
  return rank_fn


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains and evaluates; returns the flat metrics dict for results.json."""
  began = time.time()
  timelines = sources.load_timelines(config.data)
  split = splits.leave_last_out(timelines)
  print(f"[data] {timelines.name}: {timelines.num_users} users, "
        f"{timelines.num_items} items, {timelines.num_events} events; "
        f"{len(split.test)} users with held-out targets", flush=True)

  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch_divides(config.train.batch_size, mesh, "config.train.batch_size")
  mesh_lib.check_batch_divides(config.train.eval_batch_size, mesh,
                               "config.train.eval_batch_size")
  windows = sequences.training_windows(split.train, config.data.max_len)
  batcher = sequences.EpochBatcher(windows, config.train.batch_size, config.seed)

  model = build_model(config, timelines.num_items + 1)
  tx = make_optimizer(config.train)
  state, shardings = init_state(model, tx, config, mesh)
  train_step = train_loop.make_train_step(
      functools.partial(sm.next_item_loss, model), tx)

  rank_fn = make_rank_fn(model)
  # Valid histories exclude the valid target; test histories include it.
  valid_eval = RankingEvaluator(timelines, split.valid, config.data.max_len,
                                config.train.eval_batch_size, mesh)
  test_eval = RankingEvaluator(timelines, split.test, config.data.max_len,
                               config.train.eval_batch_size, mesh)
  eval_fn = lambda s: ranking.metrics_from_ranks(  # noqa: E731
      valid_eval.model_ranks(rank_fn, s.params))

  train_began = time.time()
  state = train_loop.fit(
      state=state, state_shardings=shardings, train_step=train_step,
      batch_fn=batcher, mesh=mesh, num_steps=config.train.num_steps,
      workdir=workdir, checkpoint_every=config.train.checkpoint_every,
      keep_checkpoints=config.train.keep_checkpoints,
      log_every=config.train.log_every, eval_every=config.train.eval_every,
      eval_fn=eval_fn, stop_after_steps=config.train.stop_after_steps)
  train_seconds = time.time() - train_began

  popularity = ranking.popularity_scores(split.train.item_ids,
                                         timelines.num_items + 1, config.seed)
  results = {"train_seconds": train_seconds,
             "num_users": timelines.num_users, "num_items": timelines.num_items,
             "num_events": timelines.num_events, "num_test_users": len(split.test),
             "train_windows": len(windows), "steps": int(state.step)}
  for name, evaluator in (("valid", valid_eval), ("test", test_eval)):
    for k, v in ranking.metrics_from_ranks(evaluator.model_ranks(
        rank_fn, state.params)).items():
      results[f"{name}/model/{k}"] = v
    for k, v in ranking.metrics_from_ranks(
        evaluator.fixed_score_ranks(popularity)).items():
      results[f"{name}/popularity/{k}"] = v
  results["wall_seconds"] = time.time() - began
  return results
