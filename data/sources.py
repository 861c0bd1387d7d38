"""The prologue of every workflow: load the UserTimelines `config.data` names
and describe them in one `[data]` line, with what was left out or will get no
held-out target counted. Data in which no user has two events (nothing to
learn or predict a next event from) is a DataError naming the file.

`config.data.source` picks the reader (`SOURCES`; docs/data.md): the
synthetic generator, or files in `config.data.dir` of MovieLens
(data/movielens.py), Amazon Reviews 2023 (data/amazon.py: `category`,
`events`), Google Local (data/google_local.py: `region`), Yelp (data/yelp.py)
or a SASRec-style sequence file (data/sequence_files.py: `file`,
`item_map`); the review readers take `num_categories` (the genre table's
width) and every file reader `duplicates`. A folder that is not there is a
one-line error saying how to fetch it (`python -m data.download ...`)."""

from __future__ import annotations

import os

import ml_collections

from data import (amazon, download, google_local, movielens, review_events,
                  sequence_files, splits, synthetic, yelp)
from data import timelines as tl
from infra.errors import ConfigError, DataError

SOURCES = ("synthetic", "movielens", "amazon2023", "google_local", "yelp",
           "sequence_file")
# the workflows whose prompts hold item titles, ratings and categories
TEXT_WORKFLOWS = ("user_llm", "federated_llm", "rlpf")


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
  if report.get("items_without_title"):
    notes.append(f"{report['items_without_title']} items without a title in the "
                 "metadata (titled by their id)")
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
  if data_config.source not in SOURCES:
    raise ConfigError(f"config.data.source={data_config.source!r} is not one of "
                      f"{SOURCES}")
  if not data_config.dir:
    raise ConfigError(f"config.data.dir must name a folder of "
                      f"{data_config.source} files when "
                      f"config.data.source={data_config.source!r}")
  # a synthetic config switched to files on the command line
  # (--config.data.source=movielens) has no `duplicates` field: the default
  duplicates = data_config.get("duplicates", "error")
  if duplicates not in movielens.DUPLICATES:
    raise ConfigError(f"config.data.duplicates={duplicates!r} is "
                      f"not one of {movielens.DUPLICATES}")
  if not os.path.isdir(data_config.dir):
    raise FileNotFoundError(f"config.data.dir={data_config.dir!r} is not a "
                            f"directory: {_where_to_get(data_config)}")
  return _READERS[data_config.source](data_config, duplicates, report)


def _where_to_get(data_config: ml_collections.ConfigDict) -> str:
  """How to fetch the files of `data_config.source` into `data_config.dir`."""
  source, directory = data_config.source, data_config.dir
  if source == "movielens":
    parent, folder = os.path.split(os.path.normpath(directory))
    names = [name for name, (zip_folder, _) in download.MOVIELENS.items()
             if zip_folder == folder] or list(download.MOVIELENS)
    commands = " or ".join(f"`{download.command(name, parent)}`" for name in names)
    return (f"{movielens.where_to_get_it()}; or fetch it with {commands} (a "
            "release unpacks into its own folder there: "
            f"{', '.join(f for f, _ in download.MOVIELENS.values())})")
  if source == "amazon2023":
    return amazon.hint(_field(data_config, "category"), directory,
                       data_config.get("events", "reviews"))
  if source == "google_local":
    return google_local.hint(_field(data_config, "region"), directory)
  if source == "yelp":
    return yelp.WHERE
  return sequence_files.WHERE


def _field(data_config: ml_collections.ConfigDict, name: str) -> str:
  """A string field the source needs; a ConfigError when it is missing or empty."""
  value = data_config.get(name, "")
  if not isinstance(value, str) or not value:
    raise ConfigError(f"config.data.{name} must be set for config.data.source="
                      f"{data_config.source!r} (docs/data.md gives each "
                      "source's fields)")
  return value


def _num_categories(data_config: ml_collections.ConfigDict) -> int:
  value = data_config.get("num_categories", review_events.DEFAULT_NUM_CATEGORIES)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"config.data.num_categories={value!r} must be an integer "
                      ">= 1 (the genre table's width: the most frequent "
                      "categories)")
  return value


def _read_movielens(data_config, duplicates: str, report: dict):
  return movielens.read_movielens(data_config.dir, duplicates, report)


def _read_amazon(data_config, duplicates: str, report: dict):
  events = data_config.get("events", "reviews")
  if events not in amazon.EVENTS:
    raise ConfigError(f"config.data.events={events!r} is not one of "
                      f"{amazon.EVENTS}")
  return amazon.read_amazon(data_config.dir, _field(data_config, "category"),
                            events, duplicates, _num_categories(data_config),
                            report)


def _read_google_local(data_config, duplicates: str, report: dict):
  return google_local.read_google_local(
      data_config.dir, _field(data_config, "region"), duplicates,
      _num_categories(data_config), report)


def _read_yelp(data_config, duplicates: str, report: dict):
  return yelp.read_yelp(data_config.dir, duplicates, _num_categories(data_config),
                        report)


def _read_sequence_file(data_config, duplicates: str, report: dict):
  return sequence_files.read_sequence_file(
      data_config.dir, _field(data_config, "file"),
      data_config.get("item_map", ""), duplicates, _num_categories(data_config),
      report)


_READERS = {"movielens": _read_movielens, "amazon2023": _read_amazon,
            "google_local": _read_google_local, "yelp": _read_yelp,
            "sequence_file": _read_sequence_file}


def require_item_text(timelines: tl.UserTimelines, workflow: str) -> None:
  """A ConfigError when the data lack what a text workflow (`TEXT_WORKFLOWS`)
  puts into its prompts: item titles, ratings, and two or more categories
  (the favourite-genre and summary tasks). Only a sequence file without an
  item map lacks them."""
  lacking = []
  if not any(timelines.items.titles[1:]):
    lacking.append("item titles")
  if timelines.num_events and not timelines.ratings.any():
    lacking.append("ratings")
  if len(timelines.items.genre_names) < 2:
    lacking.append(f"two or more categories (it has "
                   f"{len(timelines.items.genre_names)})")
  if lacking:
    raise ConfigError(
        f"config.data.source: {timelines.source or timelines.name} has no "
        f"{', no '.join(lacking)}, which workflow {workflow!r} puts into its "
        "prompts; give a sequence file an item map with titles and categories "
        "(config.data.item_map, docs/data.md) or run workflow next_item or "
        "federated")
