"""The task models the federated workflow can train (`config.federated.task`).

A task gives the workflow everything model-specific: the clients' training
examples, the parameters' initialiser, the per-example loss the clients
minimise, and per-row metrics of held-out events for the participation-gap
evaluation (with the user-independent baselines scored the same way). Today:
the next-item transformer; the retrieval dual encoder and User-LLM adapters
join this table as further entries.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from data import sequences, splits
from data import timelines as tl
from infra import ranking
from infra.errors import ConfigError
from userllm import next_item, sequence_model as sm


class NextItemTask:
  """Next-item prediction with the item-sequence transformer
  (`config.model`, histories of `config.data.max_len` items)."""

  name = next_item.TASK
  metrics = ("recall@10", "ndcg@10")

  def __init__(self, config, timelines: tl.UserTimelines):
    self.max_len = config.data.max_len
    self.model = next_item.build_model(config.model, timelines.num_items,
                                       self.max_len)
    self.rank_fn = next_item.make_rank_fn(self.model)
    self.example_loss = functools.partial(sm.next_item_example_losses, self.model)

  def init_params(self, rng):
    """rng -> boxed parameters (logical axis names on every leaf)."""
    return self.model.init(rng, jnp.zeros((1, self.max_len), jnp.int32))["params"]

  def client_examples(self, train: tl.UserTimelines):
    """(examples [n, max_len + 1] item windows, users [n] their owners)."""
    return sequences.training_windows_by_user(train, self.max_len)

  def baselines(self, train: tl.UserTimelines, seed: int) -> dict[str, np.ndarray]:
    """User-independent scorers: item popularity in the training events."""
    return {"popularity": ranking.popularity_scores(
        train.item_ids, train.num_items + 1, seed)}

  def row_scorer(self, timelines: tl.UserTimelines, held_out: splits.HeldOut,
                 batch_size: int, mesh) -> next_item.NextItemEvaluator:
    return next_item.NextItemEvaluator(timelines, held_out, self.max_len,
                                       batch_size, mesh, self.rank_fn, split="")

  @staticmethod
  def _from_ranks(ranks: np.ndarray) -> dict[str, np.ndarray]:
    hit = ranks < 10
    return {"recall@10": hit.astype(np.float64),
            "ndcg@10": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)}

  def row_metrics(self, scorer, params, subset: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
    """{metric: [rows]} of the model on `scorer`'s held-out rows (or `subset`)."""
    return self._from_ranks(scorer.ranks(params, subset))

  def baseline_row_metrics(self, scorer, scores) -> dict[str, np.ndarray]:
    return self._from_ranks(scorer.fixed_score_ranks(scores))


TASKS = {"next_item": NextItemTask}


def from_config(config, timelines: tl.UserTimelines):
  """The task `config.federated.task` names."""
  name = config.federated.task
  if name not in TASKS:
    raise ConfigError(f"config.federated.task={name!r} is not one of "
                      f"{sorted(TASKS)}")
  return TASKS[name](config, timelines)
