"""The task models the federated workflow can train (`config.federated.task`).

A task gives the workflow everything model-specific: the clients' training
examples, the parameters' initialiser, the per-example loss the clients
minimise, and per-row metrics of held-out events for the participation-gap
evaluation (with the user-independent baselines scored the same way), and the
server-side losses it offers mixed FL. Entries: the next-item transformer and
the retrieval dual encoder (userllm/models/dual_encoder.py).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from data import sequences, splits
from data import timelines as tl
from infra import ranking
from infra.errors import ConfigError
from userllm.models import dual_encoder as de
from userllm import next_item
from userllm.models import sequence_model as sm


class NextItemTask:
  """Next-item prediction with the item-sequence transformer
  (`config.model`, histories of `config.data.max_len` items)."""

  name = next_item.TASK
  metrics = ("recall@10", "ndcg@10")
  server_losses = ("none", "datacenter")  # what config.federated.mixed may name

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

  def rows_read(self, examples: np.ndarray) -> int | None:
    """Item-table rows a client reads (federated/cost.py): every row, since
    the output softmax scores every item."""
    del examples
    return None

  def server_loss(self, name: str, weight: float):
    """The mixed-FL server loss `name`: "datacenter" is `weight` x the mean
    example loss over the round's `server_batch` (examples the server holds,
    config.federated.datacenter; over the round's frozen weights when it has
    some)."""
    if name == "none":
      return None
    if name != "datacenter":
      raise ConfigError(f"config.federated.mixed.server_loss={name!r} is not one "
                        f"of {self.server_losses}")
    example_loss = self.example_loss

    def loss(params, server_batch, rng, *frozen):  # frozen: as the clients'
      return weight * jnp.mean(example_loss(params, server_batch, rng, *frozen))

    return loss


class RetrievalTask(NextItemTask):
  """Next-item retrieval with the dual encoder (`config.retrieval`): examples
  are (last <= context_len items, next item) pairs, and the held-out next
  events are ranked among every item by cosine (Global Recall@1/5/10; items
  already in the history excluded, as for next-item prediction)."""

  name = "retrieval"
  metrics = ("recall@1", "recall@5", "recall@10")
  server_losses = ("none", "datacenter", "global_spreadout")

  def __init__(self, config, timelines: tl.UserTimelines):
    self.cfg = de.DualEncoderConfig.from_config(config.retrieval,
                                                timelines.num_items + 1)
    self.max_len = self.cfg.context_len
    self.model = de.DualEncoder(self.cfg)
    self.rank_fn = de.make_rank_fn(self.model)
    self.example_loss = de.make_example_loss(self.model)

  def client_examples(self, train: tl.UserTimelines):
    """(examples [n, context_len + 1], users [n] their owners)."""
    return de.context_examples_by_user(train.user_items, train.num_users,
                                       self.cfg.context_len)

  @staticmethod
  def _from_ranks(ranks: np.ndarray) -> dict[str, np.ndarray]:
    return {f"recall@{k}": (ranks < k).astype(np.float64) for k in (1, 5, 10)}

  def rows_read(self, examples: np.ndarray) -> int | None:
    """How many item-table rows a client with these real examples reads (and
    whose update it sends): the items in them, or None (the whole table)
    when the loss or a spreadout reads every row."""
    dense = self.cfg.loss == "global_softmax" or any(
        name == "table" for name, _ in self.cfg.spreadout)
    return None if dense else int(np.count_nonzero(np.unique(examples)))

  def server_loss(self, name: str, weight: float):
    """"global_spreadout": `weight` x the global spreadout of the item table,
    a loss of the parameters alone (server_batch unused): the regulariser
    moved from the clients to the server (mixed FL)."""
    if name != "global_spreadout":
      return super().server_loss(name, weight)
    model = self.model

    def loss(params, server_batch, rng):
      del server_batch, rng
      return weight * de.global_spreadout(model.apply({"params": params},
                                                      method=model.table))

    return loss


TASKS = {"next_item": NextItemTask, "retrieval": RetrievalTask}


def from_config(config, timelines: tl.UserTimelines):
  """The task `config.federated.task` names."""
  name = config.federated.task
  if name not in TASKS:
    raise ConfigError(f"config.federated.task={name!r} is not one of "
                      f"{sorted(TASKS)}")
  return TASKS[name](config, timelines)
