"""The columnar user-timeline format every reader and generator produces.

One `UserTimelines` holds all events of all users as flat numpy arrays sorted by
(user, timestamp), with CSR-style `user_offsets`: the events of user `u` are rows
`user_offsets[u]:user_offsets[u + 1]`. No Python object per event.

Item index 0 is reserved for padding, so real items are `1..num_items` and any
item-indexed table has `num_items + 1` rows. Users are dense `0..num_users-1`.
The raw ids of the source files are kept in `item_raw_ids` / `user_raw_ids`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD_ITEM = 0


@dataclasses.dataclass(frozen=True)
class ItemTable:
  """Item side information, indexed by dense item index (row 0 is padding).

  Attributes:
    raw_ids: [num_items + 1] int64, id in the source files (0 for padding).
    titles: [num_items + 1] object (str), title without the year.
    years: [num_items + 1] int32, release year, 0 when unknown.
    genres: [num_items + 1, num_genres] bool multi-hot.
    genre_names: tuple of num_genres genre names.
    tags: optional [num_items + 1] object array of tuples of tag strings (the
      latest MovieLens formats' tags.csv), most used first.
    source_ids: optional [num_items + 1] object (str), the item's id in the
      source files where that is not an integer (an Amazon parent_asin, a
      Yelp business_id; "" for padding); raw_ids are then 1..num_items in the
      sorted order of these.
  """
  raw_ids: np.ndarray
  titles: np.ndarray
  years: np.ndarray
  genres: np.ndarray
  genre_names: tuple[str, ...]
  tags: np.ndarray | None = None
  source_ids: np.ndarray | None = None

  @property
  def num_items(self) -> int:
    return len(self.raw_ids) - 1


@dataclasses.dataclass(frozen=True)
class UserTable:
  """User demographics by dense user index; empty string / -1 where unknown.

  Attributes:
    raw_ids: [num_users] int64, id in the source files.
    ages: [num_users] int32, -1 when unknown.
    genders: [num_users] object (str).
    occupations: [num_users] object (str).
    zip_codes: [num_users] object (str).
    source_ids: optional [num_users] object (str), the user's id in the
      source files where that is not an integer (raw_ids are then 1..N in the
      sorted order of these).
  """
  raw_ids: np.ndarray
  ages: np.ndarray
  genders: np.ndarray
  occupations: np.ndarray
  zip_codes: np.ndarray
  source_ids: np.ndarray | None = None

  @property
  def num_users(self) -> int:
    return len(self.raw_ids)

  def subset(self, keep: np.ndarray) -> "UserTable":
    """The users where `keep` ([num_users] bool) holds, in their order."""
    return dataclasses.replace(
        self, **{f.name: getattr(self, f.name)[keep]
                 for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not None})

  @classmethod
  def unknown_demographics(cls, raw_ids: np.ndarray) -> "UserTable":
    n = len(raw_ids)
    empty = np.array([""] * n, dtype=object)
    return cls(raw_ids=np.asarray(raw_ids, np.int64),
               ages=np.full(n, -1, np.int32), genders=empty,
               occupations=empty.copy(), zip_codes=empty.copy())


@dataclasses.dataclass(frozen=True)
class UserTimelines:
  """All events, sorted by (user, timestamp); see module docstring.

  Attributes:
    name: where the data came from, e.g. "movielens_100k" or "synthetic".
    user_offsets: [num_users + 1] int64 CSR offsets into the event arrays.
    item_ids: [num_events] int32 dense item index (>= 1).
    ratings: [num_events] float32.
    timestamps: [num_events] int64 unix seconds.
    items: the ItemTable.
    users: the UserTable.
    source: where the events came from, for messages: the ratings file, or
      the config section that generated them.
  """
  name: str
  user_offsets: np.ndarray
  item_ids: np.ndarray
  ratings: np.ndarray
  timestamps: np.ndarray
  items: ItemTable
  users: UserTable
  source: str = ""

  @property
  def num_users(self) -> int:
    return len(self.user_offsets) - 1

  @property
  def num_items(self) -> int:
    return self.items.num_items

  @property
  def num_events(self) -> int:
    return len(self.item_ids)

  @property
  def lengths(self) -> np.ndarray:
    """[num_users] number of events per user."""
    return np.diff(self.user_offsets)

  @property
  def event_users(self) -> np.ndarray:
    """[num_events] dense user index of each event."""
    return np.repeat(np.arange(self.num_users), self.lengths)

  def user_items(self, user: int) -> np.ndarray:
    """[length] the items of one user in time order."""
    return self.item_ids[self.user_offsets[user]:self.user_offsets[user + 1]]

  def select_events(self, keep: np.ndarray, name: str | None = None
                    ) -> "UserTimelines":
    """A new UserTimelines with only the events where `keep` ([num_events] bool).

    Users and items keep their indices (a user may end with zero events).
    """
    counts = np.bincount(self.event_users[keep], minlength=self.num_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return dataclasses.replace(
        self, name=name or self.name, user_offsets=offsets,
        item_ids=self.item_ids[keep], ratings=self.ratings[keep],
        timestamps=self.timestamps[keep])

  def validate(self) -> "UserTimelines":
    """Checks the invariants; raises ValueError naming the broken one."""
    n = self.num_events
    for field in ("item_ids", "ratings", "timestamps"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"UserTimelines.{field} has {len(getattr(self, field))}"
                         f" rows, expected {n}")
    if self.user_offsets[0] != 0 or self.user_offsets[-1] != n:
      raise ValueError("UserTimelines.user_offsets must start at 0 and end at "
                       f"num_events={n}")
    if np.any(np.diff(self.user_offsets) < 0):
      raise ValueError("UserTimelines.user_offsets must be non-decreasing")
    if n and (self.item_ids.min() < 1 or self.item_ids.max() > self.num_items):
      raise ValueError("UserTimelines.item_ids must lie in 1..num_items")
    if self.users.num_users != self.num_users:
      raise ValueError(f"UserTable has {self.users.num_users} users, timelines "
                       f"have {self.num_users}")
    same_user = self.event_users[1:] == self.event_users[:-1]
    if np.any(np.diff(self.timestamps)[same_user] < 0):
      raise ValueError("UserTimelines events must be sorted by time per user")
    return self


def from_events(name: str, user_raw: np.ndarray, item_raw: np.ndarray,
                ratings: np.ndarray, timestamps: np.ndarray, items: ItemTable,
                users: UserTable | None = None, source: str = "") -> UserTimelines:
  """Builds UserTimelines from unsorted event columns with raw ids.

  Items are mapped through `items.raw_ids`; an event naming an unknown item is an
  error. Users are taken from `users` when given (an event naming an unknown user
  is an error), else from the distinct raw user ids in ascending order. Events are
  sorted by (user, timestamp), ties kept in file order. `source` names the
  events' file in messages.
  """
  item_index = _index_of(items.raw_ids[1:], item_raw, "item") + 1
  if users is None:
    users = UserTable.unknown_demographics(np.unique(user_raw))
  user_index = _index_of(users.raw_ids, user_raw, "user")
  order = np.lexsort((timestamps, user_index))  # stable: ties keep file order
  counts = np.bincount(user_index, minlength=users.num_users)
  return UserTimelines(
      name=name,
      user_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
      item_ids=item_index[order].astype(np.int32),
      ratings=np.asarray(ratings, np.float32)[order],
      timestamps=np.asarray(timestamps, np.int64)[order],
      items=items, users=users, source=source).validate()


def _index_of(known_raw_ids: np.ndarray, raw: np.ndarray, what: str) -> np.ndarray:
  """Positions of `raw` ids in `known_raw_ids`; error if any id is unknown."""
  sorter = np.argsort(known_raw_ids, kind="stable")
  pos = np.searchsorted(known_raw_ids, raw, sorter=sorter)
  pos = np.clip(pos, 0, len(known_raw_ids) - 1)
  found = sorter[pos]
  bad = known_raw_ids[found] != raw
  if np.any(bad):
    raise ValueError(f"{int(bad.sum())} events name a {what} id that is not in "
                     f"the {what} table, e.g. {what} id {raw[bad][0]}")
  return found
