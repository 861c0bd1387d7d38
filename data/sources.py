"""The prologue of every workflow: load the UserTimelines `config.data` names
and describe them in one `[data]` line, with what was left out or will get no
held-out target counted. Data in which no user has two events (nothing to
learn or predict a next event from) is a DataError naming the file."""

from __future__ import annotations

import os

import ml_collections

from data import movielens, splits, synthetic
from data import timelines as tl
from infra.errors import ConfigError, DataError

SOURCES = ("synthetic", "movielens")


def synthetic_spec(data_config: ml_collections.ConfigDict) -> synthetic.SyntheticSpec:
  return synthetic.SyntheticSpec(**data_config.synthetic.to_dict())


def load_timelines(data_config: ml_collections.ConfigDict, quiet: bool = False
                   ) -> tl.UserTimelines:
  """Synthetic data from `data.synthetic`, or MovieLens files from `data.dir`;
  prints the `[data]` line unless `quiet`."""
  report = {}
  timelines = _load(data_config, report)
  _check_next_events(timelines)
  if not quiet:
    print(f"[data] {describe(timelines, report)}", flush=True)
  return timelines


def describe(timelines: tl.UserTimelines, report: dict | None = None) -> str:
  """`name: N users, M items, E events`, then counted notes: users of the
  users file who rated nothing (left out), duplicates dropped (a reader's
  `report`), users too short for a leave-last-out target."""
  report = report or {}
  notes = []
  if report.get("users_without_events"):
    notes.append(f"{_users(report['users_without_events'])} of the users file "
                 "without ratings left out")
  if report.get("duplicates_dropped"):
    notes.append(f"{report['duplicates_dropped']} duplicate ratings dropped")
  short = int((timelines.lengths < splits.MIN_EVENTS_FOR_TARGET).sum())
  if short:
    notes.append(f"{_users(short)} with fewer than {splits.MIN_EVENTS_FOR_TARGET} "
                 "events (no leave-last-out target; kept for training)")
  return "; ".join([f"{timelines.name}: {timelines.num_users} users, "
                    f"{timelines.num_items} items, {timelines.num_events} "
                    "events"] + notes)


def _users(count: int) -> str:
  return f"{count} user" + ("" if count == 1 else "s")


def _check_next_events(timelines: tl.UserTimelines) -> None:
  """A DataError naming the events' file when no user has two events: every
  workflow learns and scores a user's next event from the ones before."""
  if timelines.num_events and timelines.lengths.max() >= 2:
    return
  raise DataError(f"{timelines.source or timelines.name}: no user has 2 or "
                  f"more events ({timelines.num_users} users, one event each), "
                  "so there is no next event to train on or predict; every "
                  "workflow needs users with several (a leave-last-out target "
                  f"needs {splits.MIN_EVENTS_FOR_TARGET})")


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
                              f"directory: {movielens.where_to_get_it()}")
    # a synthetic config switched to MovieLens on the command line
    # (--config.data.source=movielens) has no `duplicates` field: the default
    duplicates = data_config.get("duplicates", "error")
    if duplicates not in movielens.DUPLICATES:
      raise ConfigError(f"config.data.duplicates={duplicates!r} is "
                        f"not one of {movielens.DUPLICATES}")
    return movielens.read_movielens(data_config.dir, duplicates, report)
  raise ConfigError(f"config.data.source={data_config.source!r} is not one of "
                    f"{SOURCES}")
