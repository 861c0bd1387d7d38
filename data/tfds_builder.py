"""A tfds builder over local sources: `user_timelines/<config>`.

Configs: `synthetic`, `movielens_100k`, `movielens_1m`, `movielens_latest_small`.
MovieLens configs read the files from `source_dir` (nothing is downloaded); the
synthetic config generates from `synthetic_spec`. One example per user with a
held-out target, split leave-last-out:

- train: history = the user's train events but the last, target = the last;
- validation: history = all train events, target = the second-to-last event;
- test: history = all events but the last, target = the last event.

Use `prepare(builder_config, data_dir, ...)`; `data_dir` should be specific to the
data config (see `seqio_tasks.tfds_data_dir`), since tfds reuses prepared data.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data import movielens, prompts, splits, synthetic
from data import timelines as tl

_MOVIELENS_CONFIGS = ("movielens_100k", "movielens_1m", "movielens_latest_small")


class UserTimelines(tfds.core.GeneratorBasedBuilder):
  """User histories with their next item, from local MovieLens files or synthetic."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Leave-last-out next-item examples.",
                   "1.1.0": "Target rating and genre, user summary (multi-task)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in
                     ("synthetic",) + _MOVIELENS_CONFIGS]

  def __init__(self, *, source_dir: str | None = None,
               synthetic_spec: synthetic.SyntheticSpec | None = None, **kwargs):
    self._source_dir = source_dir
    self._synthetic_spec = synthetic_spec or synthetic.SyntheticSpec()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "user_id": np.int64,
            "history_items": tfds.features.Sequence(np.int32),
            "history_ratings": tfds.features.Sequence(np.float32),
            "history_timestamps": tfds.features.Sequence(np.int64),
            "history_titles": tfds.features.Sequence(tfds.features.Text()),
            "target_item": np.int32,
            "target_title": tfds.features.Text(),
            "favourite_genre": tfds.features.Text(),
            "target_rating": np.float32,
            "target_genre": tfds.features.Text(),  # its first genre
            "summary": tfds.features.Text(),  # data/prompts.py's summary task
        }),
        description=__doc__)

  def _load(self) -> tl.UserTimelines:
    if self.builder_config.name == "synthetic":
      return synthetic.generate(self._synthetic_spec)
    if not self._source_dir:
      raise ValueError(f"user_timelines/{self.builder_config.name} reads local "
                       "MovieLens files: pass source_dir (config.data.dir)")
    return movielens.read_movielens(self._source_dir)

  def _split_generators(self, dl_manager):
    del dl_manager  # local sources only
    data = self._load()
    split = splits.leave_last_out(data)
    users = split.test.users[split.train.lengths[split.test.users] >= 2]
    train_lengths = split.train.lengths[users]  # users with >= 1 history event
    train_held_out = splits.HeldOut(
        users=users, history_lengths=train_lengths - 1,
        targets=data.item_ids[data.user_offsets[users] + train_lengths - 1])
    return {"train": self._generate_examples(data, train_held_out),
            "validation": self._generate_examples(data, split.valid),
            "test": self._generate_examples(data, split.test)}

  def _generate_examples(self, data: tl.UserTimelines, held_out: splits.HeldOut):
    for user, length, target in zip(held_out.users, held_out.history_lengths,
                                    held_out.targets):
      start = data.user_offsets[user]
      events = slice(start, start + length)
      history = data.item_ids[events]
      yield int(user), {
          "user_id": int(data.users.raw_ids[user]),
          "history_items": history,
          "history_ratings": data.ratings[events],
          "history_timestamps": data.timestamps[events],
          "history_titles": [str(t) for t in data.items.titles[history]],
          "target_item": int(target),
          "target_title": str(data.items.titles[target]),
          "favourite_genre": favourite_genre(data.items, history),
          "target_rating": float(data.ratings[start + length]),
          "target_genre": data.items.genre_names[int(np.argmax(
              data.items.genres[target]))],
          "summary": summary(data.items, history, data.ratings[events]),
      }


def favourite_genre(items: tl.ItemTable, history: np.ndarray) -> str:
  """The genre most frequent in `history`; ties go to the earlier genre."""
  counts = items.genres[history].sum(axis=0)
  return items.genre_names[int(np.argmax(counts))] if counts.max() > 0 else "unknown"


def summary(items: tl.ItemTable, history: np.ndarray, ratings: np.ndarray) -> str:
  """The `summary` task's answer: "<genre>, <genre>; <rating level>"."""
  first, second = prompts.top_two_genres(items, history)
  level = prompts.LEVELS[prompts.rating_level(ratings)]
  return f"{items.genre_names[first]}, {items.genre_names[second]}; {level}"


def builder_config_name(data_config) -> str:
  """The `user_timelines/<config>` name for a config.data."""
  if data_config.source == "synthetic":
    return "synthetic"
  fmt = movielens.detect_format(data_config.dir)
  if fmt == "latest":
    return "movielens_latest_small"
  return f"movielens_{fmt}"
