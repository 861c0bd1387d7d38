"""Workflow `next_item`: the item-sequence transformer trained on user
timelines, evaluated by full-ranking Recall@K / NDCG@K of each user's held-out
next item, beside a popularity baseline scored on the same events.

Split: leave-last-out per user (valid = second-to-last event, test = last).
"""

from __future__ import annotations

import functools
import time

import ml_collections

from data import sequences, sources, splits
from infra import mesh as mesh_lib, optim, ranking, train_loop
from userllm import next_item
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
