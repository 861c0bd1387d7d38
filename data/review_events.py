"""What the readers of review-style data sets share (data/amazon.py,
data/google_local.py, data/yelp.py, data/sequence_files.py).

- **Streaming**: `text_lines` reads a UTF-8 text file line by line, plain or
  gzip-compressed (told by its first two bytes, whatever its name says, since
  the releases ship `.jsonl.gz` / `.json.gz`), skips blank lines and a UTF-8
  signature, and numbers lines as the (decompressed) file does; `json_records`
  parses JSON Lines. A line that is not UTF-8 or not a JSON object, a field
  that is missing or of the wrong type, and a gzip stream cut short (a partial
  download) are each a `MalformedRowError` naming `file:line` (a DataError:
  main.py prints it and exits 2).
- **Events**: `EventLog` keeps the events as they are read, with string ids
  as integer codes in compact arrays (8 bytes a field, plus one dict entry per
  distinct user and item): memory linear in events, no Python object per event.
- **Duplicates**: a (user, item) pair reviewed more than once is the
  `config.data.duplicates` policy: "error" names the repeat's line, "drop"
  keeps the earliest review (ties: the one earlier in the file; the McAuley
  lab's benchmark files keep the earliest too) and counts the rest.
- **Items**: the catalogue (`{item id: (title, categories)}`, read from the
  data set's metadata for the reviewed items only) becomes the ItemTable:
  titles with runs of white space made one space, and the genre table, a
  multi-hot over the `num_categories` most frequent categories among the
  reviewed items (`DEFAULT_NUM_CATEGORIES` = 20 unless the config says;
  ties by name). An item the metadata lacks, or whose title is empty, is kept
  (its events are real) and titled by its id, and counted
  (`report["items_without_title"]`, in the `[data]` line).
- **Ids**: string ids (ASINs, Yelp ids, Google's 21-digit user ids) become
  raw ids 1..N in their sorted order, so a user or item has the same raw id
  whatever order the file lists them in; the string ids are kept in
  `source_ids`. Sources with integer ids keep them as raw ids.
"""

from __future__ import annotations

import array
import dataclasses
import gzip
import json
import math
import os
import zlib
from collections import Counter
from typing import Iterator

import numpy as np

from data import timelines as tl
from data.movielens import DUPLICATES, MalformedRowError

DEFAULT_NUM_CATEGORIES = 20
_GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------
# Streaming.

def find_file(data_dir: str, stems: tuple[str, ...], suffixes: tuple[str, ...],
              what: str, hint: str) -> str:
  """The first of `stem + suffix` (stems outer, suffixes inner) present in
  `data_dir`; a FileNotFoundError naming what was looked for and `hint` (where
  to get it) when none is."""
  for stem in stems:
    for suffix in suffixes:
      path = os.path.join(data_dir, stem + suffix)
      if os.path.isfile(path):
        return path
  names = ", ".join(stem + suffix for stem in stems for suffix in suffixes)
  raise FileNotFoundError(f"{what} not found in {data_dir} (looked for {names}); "
                          + hint)


def text_lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, the line without its end) for every line of a
  UTF-8 file that is not blank; gzip-compressed files are read through."""
  with open(path, "rb") as f:
    compressed = f.read(2) == _GZIP_MAGIC
  number = 0
  with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
    try:
      for number, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise MalformedRowError(path, number, f"byte {raw[e.start]:#04x} is not "
                                  "UTF-8 (the release's encoding): re-download "
                                  "or re-save the file as UTF-8") from None
        if number == 1 and line.startswith("\ufeff"):
          line = line[1:]  # a UTF-8 signature
        line = line.rstrip("\r\n")
        if line.strip():
          yield number, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
      raise MalformedRowError(path, number + 1, f"the gzip stream is cut short or "
                              f"corrupt ({e}): download the file again") from None


def json_records(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, record) for every JSON object line of a JSON Lines file."""
  for number, line in text_lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise MalformedRowError(path, number, f"not JSON: {e.msg} at column "
                              f"{e.colno}") from None
    if not isinstance(record, dict):
      raise MalformedRowError(path, number, "not a JSON object (one review or "
                              "item per line)")
    yield number, record


def id_field(record: dict, key: str, path: str, line: int) -> str:
  """A non-empty string id (an integer id is taken as its decimal string)."""
  value = record.get(key)
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str) or not value.strip():
    raise MalformedRowError(path, line, f"{_field(record, key)} must be a "
                            "non-empty string id")
  return value.strip()


def integer_field(record: dict, key: str, path: str, line: int) -> int:
  """A non-negative integer (a float with no fraction is taken)."""
  value = record.get(key)
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise MalformedRowError(path, line, f"{_field(record, key)} must be a "
                            "non-negative integer")
  return value


def rating_field(record: dict, key: str, path: str, line: int) -> float:
  """A whole number of stars 1..5 (5 or 5.0)."""
  value = record.get(key)
  if isinstance(value, str):
    value = _number_or_none(value)
  if (not isinstance(value, (int, float)) or isinstance(value, bool)
      or not math.isfinite(value) or value not in (1, 2, 3, 4, 5)):
    raise MalformedRowError(path, line, f"{_field(record, key)} must be a whole "
                            "number of stars 1..5")
  return float(value)


def optional_text(record: dict, key: str, path: str, line: int) -> str:
  """A string field that may be absent or null ("" then)."""
  value = record.get(key)
  if value is None:
    return ""
  if not isinstance(value, str):
    raise MalformedRowError(path, line, f"{_field(record, key)} must be a string")
  return value


def string_list(record: dict, key: str, path: str, line: int) -> tuple[str, ...]:
  """A list of strings that may be absent or null (empty then)."""
  value = record.get(key)
  if value is None:
    return ()
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise MalformedRowError(path, line, f"{_field(record, key)} must be a list "
                            "of strings")
  return tuple(v.strip() for v in value if v.strip())


def _field(record: dict, key: str) -> str:
  """How a message names a field: its name and the value found."""
  if key not in record:
    return f"field {key!r} (missing)"
  return f"field {key!r} ({json.dumps(record[key])[:40]})"


def _number_or_none(text: str):
  try:
    return float(text)
  except ValueError:
    return None


# ----------------------------------------------------------------------------
# Events.

class EventLog:
  """Events in file order: user and item as integer codes of their string ids
  (in order of first appearance), rating, time (in the file's unit), and the
  file (an index into `paths`) and line they came from, each in a compact
  array. `source` names the events in messages: their file, or the files of
  a split (`paths`, read in turn: `read_from(path)` before each)."""

  def __init__(self, source: str, paths: list[str] | None = None):
    self.source = source
    self.paths = list(paths) if paths else [source]
    self.user_codes: dict[str, int] = {}
    self.item_codes: dict[str, int] = {}
    self._columns = {name: array.array(kind) for name, kind in (
        ("users", "q"), ("items", "q"), ("ratings", "d"), ("times", "q"),
        ("files", "q"), ("lines", "q"))}
    self._file = 0

  def read_from(self, path: str) -> None:
    """The events added next come from `path` (one of `paths`)."""
    self._file = self.paths.index(path)

  def add(self, user: str, item: str, rating: float, time: int, line: int):
    c = self._columns
    c["users"].append(self.user_codes.setdefault(user, len(self.user_codes)))
    c["items"].append(self.item_codes.setdefault(item, len(self.item_codes)))
    c["ratings"].append(rating)
    c["times"].append(time)
    c["files"].append(self._file)
    c["lines"].append(line)

  def __len__(self) -> int:
    return len(self._columns["lines"])

  def columns(self) -> dict[str, np.ndarray]:
    """{"users", "items", "times", "files", "lines": [n] int64,
    "ratings": [n] float64}."""
    return {name: np.array(column, np.float64 if name == "ratings" else np.int64)
            for name, column in self._columns.items()}


def read_json_reviews(path: str, user: str, item: str, rating: str,
                      time: str) -> EventLog:
  """The events of a JSON Lines review file whose records name the user,
  item, rating and integer time under these keys (Amazon 2023, Google
  Local); every field's error names the file and line."""
  log = EventLog(path)
  for line, record in json_records(path):
    log.add(id_field(record, user, path, line), id_field(record, item, path, line),
            rating_field(record, rating, path, line),
            integer_field(record, time, path, line), line)
  return log


def check_duplicates_policy(duplicates: str) -> None:
  if duplicates not in DUPLICATES:
    raise ValueError(f"duplicates={duplicates!r} is not one of {DUPLICATES}")


def build_timelines(name: str, log: EventLog, catalogue: dict | None,
                    duplicates: str, num_categories: int, report: dict,
                    time_divisor: int = 1, integer_ids: bool = False,
                    what: str = "reviews") -> tl.UserTimelines:
  """UserTimelines from the events of `log` (see the module docstring).

  catalogue: {item id: (title, categories)} for (at least) the reviewed
    items, or None when the source has no titles (every title "").
  time_divisor: the file's time unit per second (1000 for milliseconds).
  integer_ids: the ids are decimal integers, kept as raw ids.
  what: what the events are, for the message on a file without any.
  """
  if not len(log):
    raise MalformedRowError(log.paths[-1], 1, f"no {what} in the file")
  c = log.columns()
  order = np.lexsort((c["lines"], c["files"], c["times"]))  # ties: file order
  c = {k: v[order] for k, v in c.items()}
  keep = _earliest_of_each_pair(c, log, duplicates)
  report["duplicates_dropped"] = int((~keep).sum())
  c = {k: v[keep] for k, v in c.items()}

  user_names = np.array(list(log.user_codes), object)
  item_names = np.array(list(log.item_codes), object)
  user_raw, users = _raw_ids(user_names, integer_ids)
  item_raw, item_source = _raw_ids(item_names, integer_ids)
  items = _item_table(item_raw, item_source, item_names, catalogue,
                      num_categories, report)
  user_table = tl.UserTable.unknown_demographics(np.sort(user_raw))
  if users is not None:
    user_table = dataclasses.replace(user_table, source_ids=users)
  return tl.from_events(name, user_raw[c["users"]], item_raw[c["items"]],
                        c["ratings"], c["times"] // time_divisor, items,
                        user_table, source=log.source)


def _earliest_of_each_pair(c: dict, log: EventLog, duplicates: str) -> np.ndarray:
  """[n] bool over time-ordered events: True at each (user, item) pair's
  earliest; a repeat is an error naming its line unless duplicates="drop"."""
  pairs = c["users"] * max(len(log.item_codes), 1) + c["items"]
  _, first = np.unique(pairs, return_index=True)
  keep = np.zeros(len(pairs), bool)
  keep[first] = True
  if duplicates == "error" and not keep.all():
    repeats = np.nonzero(~keep)[0]  # the repeat first in the files
    i = int(repeats[np.lexsort((c["lines"][repeats], c["files"][repeats]))[0]])
    j = first[np.searchsorted(pairs[first], pairs[i])]
    earlier = (f"line {c['lines'][j]}" if c["files"][j] == c["files"][i] else
               f"{log.paths[c['files'][j]]}:{c['lines'][j]}")
    user = list(log.user_codes)[c["users"][i]]
    item = list(log.item_codes)[c["items"][i]]
    raise MalformedRowError(
        log.paths[c["files"][i]], int(c["lines"][i]), f"user {user} reviewed "
        f"item {item} again (also at {earlier}); set "
        "config.data.duplicates='drop' to keep the earliest")
  return keep


def _raw_ids(names: np.ndarray, integer_ids: bool
             ) -> tuple[np.ndarray, np.ndarray | None]:
  """(raw id per code [n] int64, the string ids in raw-id order or None):
  integers as they are, else 1..n in the sorted order of the strings."""
  if integer_ids:
    return names.astype(np.int64), None
  by_name = np.argsort(names, kind="stable")
  raw = np.empty(len(names), np.int64)
  raw[by_name] = np.arange(1, len(names) + 1)
  return raw, names[by_name]


def _item_table(item_raw: np.ndarray, item_source: np.ndarray | None,
                item_names: np.ndarray, catalogue: dict | None,
                num_categories: int, report: dict) -> tl.ItemTable:
  """The ItemTable of the reviewed items, in raw-id order (row 0 padding)."""
  order = np.argsort(item_raw, kind="stable")
  names = item_names[order]
  titles, categories = [], []
  untitled = 0
  for item in names:
    title, item_categories = ("", ()) if catalogue is None else catalogue.get(
        item, ("", ()))
    title = " ".join(title.split())
    if catalogue is not None and not title:
      title, untitled = str(item), untitled + 1
    titles.append(title)
    categories.append(item_categories)
  report["items_without_title"] = untitled
  genre_names, genres = category_multi_hot(categories, num_categories)
  pad = lambda values, first, dtype: np.concatenate(  # noqa: E731
      [np.array([first], dtype), np.asarray(values, dtype)])
  return tl.ItemTable(
      raw_ids=pad(item_raw[order], 0, np.int64),
      titles=pad(titles, "", object),
      years=np.zeros(len(names) + 1, np.int32),
      genres=np.concatenate([np.zeros((1, len(genre_names)), bool), genres]),
      genre_names=genre_names,
      source_ids=None if item_source is None else pad(item_source, "", object))


def category_multi_hot(categories: list[tuple[str, ...]], k: int
                       ) -> tuple[tuple[str, ...], np.ndarray]:
  """(the k most frequent categories over the items, most frequent first,
  ties by name; [items, len(names)] bool multi-hot)."""
  counts = Counter(c for item in categories for c in set(item))
  names = tuple(sorted(counts, key=lambda c: (-counts[c], c))[:k])
  column = {c: j for j, c in enumerate(names)}
  out = np.zeros((len(categories), len(names)), bool)
  for i, item in enumerate(categories):
    for c in item:
      if c in column:
        out[i, column[c]] = True
  return names, out
