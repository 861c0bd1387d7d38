"""Synthetic generator, splits and fixed-shape sequences."""

import dataclasses

import numpy as np
import pytest

from data import sequences, splits, synthetic
from infra.errors import ConfigError

SMALL = synthetic.SyntheticSpec(num_users=50, num_items=100, min_events=5,
                                mean_extra_events=10.0, max_events=40)


def test_synthetic_is_deterministic_by_seed():
  a, b = synthetic.generate(SMALL), synthetic.generate(SMALL)
  for field in ("user_offsets", "item_ids", "ratings", "timestamps"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  np.testing.assert_array_equal(a.items.titles, b.items.titles)
  c = synthetic.generate(dataclasses.replace(SMALL, seed=1))
  assert not np.array_equal(a.item_ids[:100], c.item_ids[:100])


@pytest.mark.parametrize("users_per_chunk", [synthetic.USERS_PER_CHUNK, 16])
def test_synthetic_structure(users_per_chunk, monkeypatch):
  """The same structure whether users are simulated together or in chunks
  (large populations: memory bounded by the chunk)."""
  monkeypatch.setattr(synthetic, "USERS_PER_CHUNK", users_per_chunk)
  data = synthetic.generate(SMALL)
  np.testing.assert_array_equal(data.item_ids, synthetic.generate(SMALL).item_ids)
  assert data.num_users == 50 and data.num_items == 100
  assert data.lengths.min() >= 5 and data.lengths.max() <= 40
  for user in range(data.num_users):  # each user meets an item at most once
    items = data.user_items(user)
    assert len(np.unique(items)) == len(items)
  assert set(np.unique(data.ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
  assert len(set(data.items.titles[1:])) == data.num_items  # unique titles
  assert data.items.genres[1:].sum(1).min() >= 1


def test_synthetic_bad_spec_names_field():
  with pytest.raises(ConfigError, match="config.data.synthetic.follow_prob"):
    synthetic.generate(dataclasses.replace(SMALL, follow_prob=1.5))


def test_synthetic_communities_follow_their_own_related_items():
  """With every next item a related one (follow_prob 1), a community's users
  step only along its own map: transitions seen in one community are
  mostly unseen in another, while without communities every user shares
  one map. No communities: the data is exactly what it was (the maps of
  communities come from a generator of their own)."""
  spec = synthetic.SyntheticSpec(num_users=200, num_items=400, min_events=10,
                                 mean_extra_events=5.0, max_events=30,
                                 follow_prob=1.0)

  def transitions(timelines, users):
    pairs = set()
    for u in users:
      items = timelines.user_items(u)
      pairs.update(zip(items[:-1].tolist(), items[1:].tolist()))
    return pairs

  def overlap(timelines, community_of):
    a = transitions(timelines, np.nonzero(community_of == 0)[0])
    b = transitions(timelines, np.nonzero(community_of == 1)[0])
    return len(a & b) / min(len(a), len(b))

  plain = synthetic.generate(spec)
  both = dataclasses.replace(spec, communities=2)
  split = synthetic.generate(both)
  halves = synthetic.community_of_users(both)
  # two maps of 5 among a genre's ~22 items share some pairs by chance
  assert overlap(split, halves) < 0.2 < 0.4 < overlap(plain, halves)
  again = synthetic.generate(dataclasses.replace(spec, communities=0))
  np.testing.assert_array_equal(again.item_ids, plain.item_ids)
  with pytest.raises(ConfigError, match="communities"):
    synthetic.generate(dataclasses.replace(spec, communities=-1))


def test_leave_last_out():
  data = synthetic.generate(SMALL)
  split = splits.leave_last_out(data)
  assert split.train.num_events == data.num_events - 2 * data.num_users
  np.testing.assert_array_equal(split.train.lengths, data.lengths - 2)
  for i, user in enumerate(split.test.users):
    items = data.user_items(user)
    assert split.test.targets[i] == items[-1]
    assert split.valid.targets[i] == items[-2]
    np.testing.assert_array_equal(split.train.user_items(user), items[:-2])


def test_leave_last_out_keeps_short_users_in_train():
  data = synthetic.generate(SMALL)
  short = data.select_events(np.arange(data.num_events) <
                             data.user_offsets[1] + 2)  # user 1 keeps 2 events
  split = splits.leave_last_out(short)
  assert split.num_users_without_targets == short.num_users - 1
  assert split.train.num_events == short.num_events - 2


def test_global_time_split():
  data = synthetic.generate(SMALL)
  train, test, cutoff = splits.global_time_split(data, 0.2)
  assert train.num_events + test.num_events == data.num_events
  assert train.timestamps.max() < cutoff <= test.timestamps.min()
  assert abs(test.num_events / data.num_events - 0.2) < 0.02


def test_training_windows_cover_every_target_once():
  data = synthetic.generate(SMALL)
  windows = sequences.training_windows(data, max_len=7)
  targets = windows[:, 1:]
  assert (targets != 0).sum() == data.num_events - data.num_users
  for w in windows:  # padding only at the end
    real = np.nonzero(w)[0]
    assert real.tolist() == list(range(len(real)))


def test_history_inputs_take_the_last_items():
  data = synthetic.generate(SMALL)
  split = splits.leave_last_out(data)
  inputs, lengths = sequences.history_inputs(data, split.test, max_len=6)
  items = data.user_items(split.test.users[0])
  np.testing.assert_array_equal(inputs[0], items[-7:-1])
  assert lengths[0] == 6


def _short_and_long_users():
  """SMALL's timelines with users cut to 0, 1, 2 and many events."""
  data = synthetic.generate(SMALL)
  position = np.arange(data.num_events) - np.repeat(data.user_offsets[:-1], data.lengths)
  keep_of_user = np.resize([0, 1, 2, 7, 8, 1000], data.num_users)
  return data.select_events(position < np.repeat(keep_of_user, data.lengths))


def test_windows_and_histories_equal_a_loop_over_users():
  """The vectorised gathers against the obvious per-user loop."""
  data, max_len = _short_and_long_users(), 7
  windows, owners = sequences.training_windows_by_user(data, max_len)
  expected, expected_owners = [], []
  for user in range(data.num_users):
    items = data.user_items(user)
    for start in range(0, max(len(items) - 1, 0), max_len):
      chunk = items[start:start + max_len + 1]
      expected.append(np.pad(chunk, (0, max_len + 1 - len(chunk))))
      expected_owners.append(user)
  np.testing.assert_array_equal(windows, np.stack(expected))
  np.testing.assert_array_equal(owners, expected_owners)
  assert windows.dtype == owners.dtype == np.int32

  held_out = splits.leave_last_out(data).test
  inputs, lengths = sequences.history_inputs(data, held_out, max_len)
  for row, (user, cut) in enumerate(zip(held_out.users, held_out.history_lengths)):
    history = data.user_items(user)[:cut][-max_len:]
    assert lengths[row] == len(history)
    np.testing.assert_array_equal(inputs[row], np.pad(history, (0, max_len - len(history))))


def test_epoch_batcher_is_a_function_of_the_step():
  examples = np.arange(50)[:, None]
  a, b = sequences.EpochBatcher(examples, 8, 0), sequences.EpochBatcher(examples, 8, 0)
  np.testing.assert_array_equal(a(13), b(13))
  epoch = np.concatenate([a(s) for s in range(a.steps_per_epoch)])
  assert len(np.unique(epoch)) == len(epoch) == 48  # no repeats within an epoch
  from infra.errors import ConfigError  # the user's to fix: exit 2, one line
  with pytest.raises(ConfigError, match="batch_size=64 exceeds the 50"):
    sequences.EpochBatcher(examples, 64, 0)
