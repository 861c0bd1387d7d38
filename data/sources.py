"""Loads the UserTimelines a config names (`config.data.source`)."""

from __future__ import annotations

import os

import ml_collections

from data import movielens, synthetic
from data import timelines as tl
from infra.errors import ConfigError

SOURCES = ("synthetic", "movielens")


def synthetic_spec(data_config: ml_collections.ConfigDict) -> synthetic.SyntheticSpec:
  return synthetic.SyntheticSpec(**data_config.synthetic.to_dict())


def load_timelines(data_config: ml_collections.ConfigDict) -> tl.UserTimelines:
  """Synthetic data from `data.synthetic`, or MovieLens files from `data.dir`."""
  if data_config.source == "synthetic":
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
    return movielens.read_movielens(data_config.dir)
  raise ConfigError(f"config.data.source={data_config.source!r} is not one of "
                    f"{SOURCES}")
