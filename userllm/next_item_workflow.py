"""Workflow `next_item`: the item-sequence transformer trained on user
timelines, evaluated by full-ranking Recall@K / NDCG@K of each user's held-out
next item, beside a popularity baseline scored on the same events.

Split: leave-last-out per user (valid = second-to-last event, test = last).

Modes on a finished workdir (main.py --mode, docs/using.md): `evaluate`
(restore, never train, evaluate again) and `recommend` (the top-k next items
of given users after their whole history).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import sequences, sources, splits
from infra import mesh as mesh_lib, optim, ranking, train_loop
from userllm import next_item, use
from userllm.models import sequence_model as sm


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, float]:
  """Trains and evaluates; returns the flat metrics for results.json."""
  began = time.time()
  timelines = sources.load_timelines(config.data)
  split = splits.leave_last_out(timelines)
  print(f"[split] leave-last-out: {len(split.test)} users with held-out targets",
        flush=True)
  train = config.train
  mesh_lib.check_batch_divides(train.batch_size, mesh, "config.train.batch_size")
  mesh_lib.check_batch_divides(train.eval_batch_size, mesh,
                               "config.train.eval_batch_size")
  windows = sequences.training_windows(split.train, config.data.max_len)
  batches = sequences.EpochBatcher(windows, train.batch_size, config.seed)

  model = next_item.build_model(config.model, timelines.num_items,
                                config.data.max_len)
  tx = optim.make_optimizer(train)
  state, shardings = next_item.init_state(model, tx, config.seed, mesh)
  train_step = train_loop.make_train_step(
      functools.partial(sm.next_item_loss, model), tx)

  rank_fn = next_item.make_rank_fn(model)
  popularity = ranking.popularity_scores(split.train.item_ids,
                                         timelines.num_items + 1, config.seed)
  # Valid histories exclude the valid target; test histories include it.
  valid, test = (next_item.NextItemEvaluator(
      timelines, held_out, config.data.max_len, train.eval_batch_size, mesh,
      rank_fn, name, {"popularity": popularity})
      for name, held_out in (("valid", split.valid), ("test", split.test)))

  train_began = time.time()
  use.require_finished(workdir, train, "train", "config.train")
  state = train_loop.fit(state=state, state_shardings=shardings,
                         train_step=train_step, batch_fn=batches, mesh=mesh,
                         workdir=workdir, schedule=train,
                         eval_fn=lambda s: valid.evaluate(s.params),
                         identity=config.to_dict())
  results = {"train_seconds": time.time() - train_began,
             "num_users": timelines.num_users, "num_items": timelines.num_items,
             "num_events": timelines.num_events, "num_test_users": len(split.test),
             "train_windows": len(windows), "steps": int(state.step)}
  results.update(valid.evaluate(state.params))
  results.update(test.evaluate(state.params))
  results["wall_seconds"] = time.time() - began
  return results


# --- a finished workdir (main.py --mode; docs/using.md) --------------------------

def evaluate(config: ml_collections.ConfigDict, workdir: str, mesh
             ) -> dict[str, float]:
  """--mode=eval: `run` with the model restored from its finished checkpoint
  and never trained (an unfinished one is a WorkdirError); the metrics again."""
  with use.restoring():
    return run(config, workdir, mesh)


def recommend(config: ml_collections.ConfigDict, workdir: str, mesh,
              users: list[str], k: int) -> dict:
  """--mode=recommend: for each of `users` (ids of the data files), the `k`
  items the trained model scores highest after the user's whole history (its
  latest `config.data.max_len` items read), items it already rated excluded.
  Writes `<workdir>/use/recommendations.json`; returns the same payload."""
  timelines = sources.load_timelines(config.data)
  asked = use.user_indices(timelines, users)
  model = next_item.build_model(config.model, timelines.num_items,
                                config.data.max_len)
  state, _ = next_item.init_state(model, optim.make_optimizer(config.train),
                                  config.seed, mesh)
  state = use.restore(workdir, config.train, config.to_dict(), state, "train",
                      "config.train")
  whole = splits.HeldOut(asked, timelines.lengths[asked],
                         np.zeros(len(asked), np.int32))  # no target: the future
  inputs, lengths = sequences.history_inputs(timelines, whole, config.data.max_len)
  excluded = sequences.excluded_items(sequences.seen_items(timelines, whole),
                                      len(asked), timelines.num_items + 1)
  scores = np.asarray(_next_item_scores(model)(state.params,
                                               inputs, np.maximum(lengths, 1)))
  rows = []
  for row, user in enumerate(asked):
    best, probability = use.top_k(scores[row], excluded[row], k)
    rows.append({**use.user_entry(timelines, user), "recommendations": [
        {**use.item_entry(timelines, item), "score": float(scores[row, item]),
         "probability": float(p)} for item, p in zip(best, probability)]})
  payload = {"workflow": "next_item", "workdir": workdir, "k": k,
             "scored_by": "the item-sequence transformer's next-item logits "
                          "after the whole history; rated items excluded; "
                          "probability: softmax over the unrated items",
             "users": rows}
  use.save(workdir, "recommendations", payload)
  return payload


def _next_item_scores(model):
  """jitted (params, inputs [n, len], lengths [n]) -> [n, items + 1] logits of
  the item after each row's last real item."""
  @jax.jit
  def scores(params, inputs, lengths):
    states = model.apply({"params": params}, inputs, method=model.encode)
    last = jnp.take_along_axis(states, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.apply({"params": params}, last, method=model.item_logits)
  return scores
