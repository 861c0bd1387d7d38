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
  windows, users = [], []
  for user in range(timelines.num_users):
    items = timelines.user_items(user)
    for start in range(0, max(len(items) - 1, 0), max_len):
      chunk = items[start:start + max_len + 1]
      windows.append(np.pad(chunk, (0, max_len + 1 - len(chunk))))
      users.append(user)
  windows = (np.stack(windows) if windows else
             np.zeros((0, max_len + 1))).astype(np.int32)
  return windows, np.asarray(users, np.int32)


def history_inputs(timelines: tl.UserTimelines, held_out: splits.HeldOut,
                   max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """The last `max_len` history items before each held-out target.

  Returns:
    inputs: [k, max_len] int32 right-padded item sequences.
    lengths: [k] int32 number of real items in each row (>= 1).
  """
  inputs = np.zeros((len(held_out), max_len), np.int32)
  lengths = np.minimum(held_out.history_lengths, max_len).astype(np.int32)
  for row, (user, hist_len) in enumerate(zip(held_out.users,
                                             held_out.history_lengths)):
    start = timelines.user_offsets[user]
    history = timelines.item_ids[start + hist_len - lengths[row]:start + hist_len]
    inputs[row, :lengths[row]] = history
  return inputs, lengths


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
