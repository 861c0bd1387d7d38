"""A tfds builder over local sources: `user_timelines/<config>`.

Configs: `synthetic`, `movielens_100k`, `movielens_1m`, `movielens_latest_small`.
MovieLens configs read the files from `source_dir` (nothing is downloaded); the
synthetic config generates from `synthetic_spec`. One example per (user, cut):
the user's events before the cut (the history) and the event at the cut (the
target), as facts only. Task prompts and answers are not stored: they are
data/prompts.py's, computed from `user` and `cut` (data/seqio_tasks.py).

- train: `train_cuts_per_user` random cuts per user of the leave-last-out train
  events, exactly the (user, cut) rows of `prompts.training_examples(split.train,
  train_cuts_per_user, train_seed)`, the in-memory input path's examples;
- validation: history = all train events, target = the second-to-last event;
- test: history = all events but the last, target = the last event.

`cut` indexes the user's full timeline. Prepare it with a `data_dir` specific
to the data and the train cuts (`seqio_tasks.tfds_data_dir`), since tfds reuses
prepared data.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data import movielens, prompts, splits, synthetic
from data import timelines as tl

_MOVIELENS_CONFIGS = ("movielens_100k", "movielens_1m", "movielens_latest_small")


class UserTimelines(tfds.core.GeneratorBasedBuilder):
  """User histories with the event at a cut, from local MovieLens files or synthetic."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "Leave-last-out next-item examples.",
                   "1.1.0": "Target rating and genre, user summary (multi-task).",
                   "2.0.0": "Facts only (labels are data/prompts.py's); user index "
                            "and cut; train split = the training examples' cuts."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in
                     ("synthetic",) + _MOVIELENS_CONFIGS]

  def __init__(self, *, source_dir: str | None = None,
               synthetic_spec: synthetic.SyntheticSpec | None = None,
               train_cuts_per_user: int = 1, train_seed: int = 0,
               duplicates: str = "error", **kwargs):
    self._source_dir, self._duplicates = source_dir, duplicates
    self._synthetic_spec = synthetic_spec or synthetic.SyntheticSpec()
    self._train_cuts_per_user, self._train_seed = train_cuts_per_user, train_seed
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "user": np.int32,  # row of the user in the timelines
            "cut": np.int32,  # position of the target in the user's timeline
            "user_id": np.int64,  # the source's id
            "history_items": tfds.features.Sequence(np.int32),
            "history_ratings": tfds.features.Sequence(np.float32),
            "history_timestamps": tfds.features.Sequence(np.int64),
            "history_titles": tfds.features.Sequence(tfds.features.Text()),
            "target_item": np.int32,
            "target_title": tfds.features.Text(),
            "target_rating": np.float32,
        }),
        description=__doc__)

  def _load(self) -> tl.UserTimelines:
    if self.builder_config.name == "synthetic":
      return synthetic.generate(self._synthetic_spec)
    if not self._source_dir:
      raise ValueError(f"user_timelines/{self.builder_config.name} reads local "
                       "MovieLens files: pass source_dir (config.data.dir)")
    return movielens.read_movielens(self._source_dir, self._duplicates)

  def _split_generators(self, dl_manager):
    del dl_manager  # local sources only
    data = self._load()
    split = splits.leave_last_out(data)
    train = prompts.training_examples(split.train, self._train_cuts_per_user,
                                      self._train_seed, tasks=prompts.TASKS[:1])
    return {"train": self._generate_examples(data, train.users, train.cuts),
            "validation": self._generate_examples(data, split.valid.users,
                                                  split.valid.history_lengths),
            "test": self._generate_examples(data, split.test.users,
                                            split.test.history_lengths)}

  def _generate_examples(self, data: tl.UserTimelines, users: np.ndarray,
                         cuts: np.ndarray):
    for user, cut in zip(users, cuts):
      start = data.user_offsets[user]
      events = slice(start, start + cut)
      target = int(data.item_ids[start + cut])
      yield f"{user}_{cut}", {
          "user": int(user), "cut": int(cut),
          "user_id": int(data.users.raw_ids[user]),
          "history_items": data.item_ids[events],
          "history_ratings": data.ratings[events],
          "history_timestamps": data.timestamps[events],
          "history_titles": [str(t) for t in data.items.titles[data.item_ids[events]]],
          "target_item": target,
          "target_title": str(data.items.titles[target]),
          "target_rating": float(data.ratings[start + cut]),
      }


def builder_config_name(data_config) -> str:
  """The `user_timelines/<config>` name for a config.data."""
  if data_config.source == "synthetic":
    return "synthetic"
  fmt = movielens.detect_format(data_config.dir)
  if fmt == "latest":
    return "movielens_latest_small"
  return f"movielens_{fmt}"
