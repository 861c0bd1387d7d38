"""Fixed-shape item sequences for sequence models, built once as numpy arrays.

Sequences are right-padded with `PAD_ITEM` (0): with causal attention a real
position never sees the padding after it, and losses mask padded targets.
"""

from __future__ import annotations

import numpy as np

from data import splits
from data import timelines as tl
from infra.errors import ConfigError, DataError


def training_windows(timelines: tl.UserTimelines, max_len: int) -> np.ndarray:
  """Cuts every timeline into windows of `max_len + 1` items.

  Consecutive windows overlap by one item, so every event (but each user's first)
  is a next-item target exactly once. Users with fewer than 2 events give none.

  Returns:
    [num_windows, max_len + 1] int32; inputs are `w[:, :-1]`, targets `w[:, 1:]`.
  """
  windows, _ = training_windows_by_user(timelines, max_len)
  if not len(windows):
    raise DataError(f"{timelines.source}: no user has 2 or more training events "
                    f"({timelines.name}), so there is no next item to train on")
  return windows


def training_windows_by_user(timelines: tl.UserTimelines, max_len: int
                             ) -> tuple[np.ndarray, np.ndarray]:
  """`training_windows` and the user each window came from.

  Returns:
    windows: [num_windows, max_len + 1] int32 (possibly zero windows).
    users: [num_windows] int32 dense user index of each window.
  """
  lengths = timelines.lengths
  # Windows start every max_len items while a next item is left to predict.
  per_user = np.where(lengths >= 2, -(-(lengths - 1) // max_len), 0)
  users = np.repeat(np.arange(timelines.num_users), per_user)
  within = np.arange(len(users)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
  starts = timelines.user_offsets[users] + within * max_len
  windows = _gather(timelines.item_ids, starts, timelines.user_offsets[users + 1],
                    max_len + 1)
  return windows, users.astype(np.int32)


def _gather(item_ids: np.ndarray, starts: np.ndarray, stops: np.ndarray,
            width: int) -> np.ndarray:
  """[len(starts), width] int32: item_ids[starts[i]:stops[i]] in row i,
  truncated to `width` and right-padded with PAD_ITEM (no loop over rows)."""
  index = starts[:, None] + np.arange(width)[None, :]
  inside = index < stops[:, None]
  safe = np.minimum(index, max(len(item_ids) - 1, 0))
  taken = item_ids[safe] if len(item_ids) else np.zeros(index.shape, np.int32)
  return np.where(inside, taken, 0).astype(np.int32)


def history_inputs(timelines: tl.UserTimelines, held_out: splits.HeldOut,
                   max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """The last `max_len` history items before each held-out target.

  Returns:
    inputs: [k, max_len] int32 right-padded item sequences.
    lengths: [k] int32 number of real items in each row (>= 1).
  """
  lengths = np.minimum(held_out.history_lengths, max_len).astype(np.int32)
  stops = timelines.user_offsets[held_out.users] + held_out.history_lengths
  return _gather(timelines.item_ids, stops - lengths, stops, max_len), lengths


def seen_items(timelines: tl.UserTimelines, held_out: splits.HeldOut
               ) -> list[np.ndarray]:
  """For each held-out row, every item in its whole history (not just max_len)."""
  return [timelines.user_items(u)[:n]
          for u, n in zip(held_out.users, held_out.history_lengths)]


class EpochBatcher:
  """Batch `step` of shuffled epochs over `examples`, as a pure function of step.

  Each epoch is a fresh permutation drawn from (seed, epoch); the last partial
  batch of an epoch is not used in that epoch (fixed shapes: one compilation),
  and since the permutation changes every epoch no example is always left out.
  Being a function of the step, resuming at step s gives the same batches as an
  uninterrupted run.
  """

  def __init__(self, examples: np.ndarray, batch_size: int, seed: int):
    if len(examples) < batch_size:
      raise ConfigError(f"batch_size={batch_size} exceeds the {len(examples)} "
                        "training examples: lower the stage's "
                        "config.<section>.batch_size")
    self.examples, self.batch_size, self.seed = examples, batch_size, seed
    self.steps_per_epoch = len(examples) // batch_size
    self._epoch, self._order = -1, None  # cache: one permutation per epoch

  def __call__(self, step: int) -> np.ndarray:
    epoch, index = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch, self._order = epoch, rng.permutation(len(self.examples))
    rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
    return self.examples[rows]


def excluded_items(histories: list[np.ndarray], num_rows: int, vocab: int
                   ) -> np.ndarray:
  """[num_rows, vocab] bool: the padding item, and row i's `histories[i]`
  (items a user already rated are never the next one); extra rows exclude
  only the padding. The `excluded` argument of `infra.ranking.target_ranks`."""
  mask = np.zeros((num_rows, vocab), bool)
  mask[:, tl.PAD_ITEM] = True
  for row, items in enumerate(histories):
    mask[row, items] = True
  return mask
