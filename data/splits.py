"""Train / valid / test splits of UserTimelines.

- `leave_last_out`: per user, the last event is test, the one before is valid, the
  rest is train (users with fewer than 3 events keep all events in train and get
  no held-out target; `LeaveLastOut.num_users_without_targets` counts them, and
  data in which no user has 3 is a DataError naming the file).
- `global_time_split`: every event before a global cutoff time is train, the rest
  is test, so no training event comes after a test event.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import timelines as tl
from infra.errors import DataError

MIN_EVENTS_FOR_TARGET = 3  # leave-last-out: train events, valid, test


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Held-out next events: the target of user `users[i]` is its event number
  `history_lengths[i]` (0-based), predicted from the events before it.

  Attributes:
    users: [k] dense user indices.
    history_lengths: [k] number of events before the target.
    targets: [k] int32 item index of the target event.
  """
  users: np.ndarray
  history_lengths: np.ndarray
  targets: np.ndarray

  def __len__(self) -> int:
    return len(self.users)


@dataclasses.dataclass(frozen=True)
class LeaveLastOut:
  full: tl.UserTimelines
  train: tl.UserTimelines
  valid: HeldOut
  test: HeldOut
  num_users_without_targets: int


def leave_last_out(timelines: tl.UserTimelines) -> LeaveLastOut:
  """Splits off each user's last event (test) and second-to-last (valid)."""
  lengths = timelines.lengths
  has_targets = lengths >= MIN_EVENTS_FOR_TARGET
  if not has_targets.any():
    counts = np.bincount(lengths, minlength=MIN_EVENTS_FOR_TARGET)
    raise DataError(
        f"{timelines.source or timelines.name}: no user has "
        f"{MIN_EVENTS_FOR_TARGET} or more events, so none has a held-out "
        f"target (leave-last-out holds out each user's last two events and "
        f"trains on the rest); users with 1 event: {counts[1]}, with 2: "
        f"{counts[2]}")
  users = np.nonzero(has_targets)[0]
  ends = timelines.user_offsets[1:]
  position = np.arange(timelines.num_events) - np.repeat(
      timelines.user_offsets[:-1], lengths)
  event_user_len = np.repeat(lengths, lengths)
  keep = ~np.repeat(has_targets, lengths) | (position < event_user_len - 2)

  def held_out(back: int) -> HeldOut:
    return HeldOut(users=users, history_lengths=lengths[users] - back,
                   targets=timelines.item_ids[ends[users] - back])

  return LeaveLastOut(
      full=timelines, train=timelines.select_events(keep),
      valid=held_out(2), test=held_out(1),
      num_users_without_targets=int((~has_targets).sum()))


def global_time_split(timelines: tl.UserTimelines, test_fraction: float
                      ) -> tuple[tl.UserTimelines, tl.UserTimelines, int]:
  """(train, test, cutoff): events with timestamp < cutoff are train.

  The cutoff is the (1 - test_fraction) quantile of all event times.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  cutoff = int(np.quantile(timelines.timestamps, 1.0 - test_fraction))
  is_train = timelines.timestamps < cutoff
  return (timelines.select_events(is_train), timelines.select_events(~is_train),
          cutoff)
