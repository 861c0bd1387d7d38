"""The prologue of every workflow: load the UserTimelines `config.data` names
and describe them in one `[data]` line."""

from __future__ import annotations

import os

import ml_collections

from data import movielens, synthetic
from data import timelines as tl
from infra.errors import ConfigError

SOURCES = ("synthetic", "movielens")


def synthetic_spec(data_config: ml_collections.ConfigDict) -> synthetic.SyntheticSpec:
  return synthetic.SyntheticSpec(**data_config.synthetic.to_dict())


def load_timelines(data_config: ml_collections.ConfigDict, quiet: bool = False
                   ) -> tl.UserTimelines:
  """Synthetic data from `data.synthetic`, or MovieLens files from `data.dir`;
  prints the `[data]` line unless `quiet`."""
  report = {}
  timelines = _load(data_config, report)
  if not quiet:
    dropped = report.get("duplicates_dropped", 0)
    note = f"; {dropped} duplicate ratings dropped" if dropped else ""
    print(f"[data] {describe(timelines)}{note}", flush=True)
  return timelines


def describe(timelines: tl.UserTimelines) -> str:
  return (f"{timelines.name}: {timelines.num_users} users, {timelines.num_items} "
          f"items, {timelines.num_events} events")


def _load(data_config: ml_collections.ConfigDict, report: dict) -> tl.UserTimelines:
  if data_config.source == "synthetic":
    if data_config.dir:
      raise ConfigError(f"config.data.dir={data_config.dir!r} is set but "
                        "config.data.source='synthetic' (set "
                        "config.data.source='movielens' to read it)")
    try:
      return synthetic.generate(synthetic_spec(data_config))
    except TypeError as e:  # an unknown field in config.data.synthetic
      raise ConfigError(f"config.data.synthetic: {e}") from None
  if data_config.source == "movielens":
    if not data_config.dir:
      raise ConfigError("config.data.dir must name a MovieLens directory when "
                        "config.data.source='movielens'")
    if not os.path.isdir(data_config.dir):
      raise FileNotFoundError(f"config.data.dir={data_config.dir!r} is not a "
                              "directory")
    # a synthetic config switched to MovieLens on the command line
    # (--config.data.source=movielens) has no `duplicates` field: the default
    duplicates = data_config.get("duplicates", "error")
    if duplicates not in movielens.DUPLICATES:
      raise ConfigError(f"config.data.duplicates={duplicates!r} is "
                        f"not one of {movielens.DUPLICATES}")
    return movielens.read_movielens(data_config.dir, duplicates, report)
  raise ConfigError(f"config.data.source={data_config.source!r} is not one of "
                    f"{SOURCES}")
