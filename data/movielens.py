"""Readers for the three MovieLens formats into `UserTimelines`.

- 100K (`u.data`, `u.item`, `u.user`, `u.genre`): tab / pipe separated, Latin-1.
- 1M (`ratings.dat`, `movies.dat`, `users.dat`): `::` separated, Latin-1.
- latest / latest-small (`ratings.csv`, `movies.csv`, optional `tags.csv`): CSV with
  a header and quoted titles, UTF-8.

`read_movielens(dir)` detects the format from the files present. Every field
is checked against its format: ids are integers, ratings finite and in the
format's range (1..5 whole stars for 100K and 1M, 0.5..5 in half stars for
latest), timestamps non-negative integers, every rated item (and user, where
there is a users file) listed, the file in its format's encoding, and a
(user, item) pair rated once (`duplicates="drop"` keeps the first and counts
the rest). Any problem raises `MalformedRowError` naming the file and the
1-based line; so does a file with no rows (no genres, movies, users or
ratings). A directory or file that is not there is a FileNotFoundError that
says where MovieLens comes from (`DOWNLOAD`) and which files each format has.
Users of the users file who rated nothing are left out and counted
(`report["users_without_events"]`), so every user has events.
"""

from __future__ import annotations

import csv
import io
import os
import re

import numpy as np

from data import timelines as tl
from infra.errors import DataError

# Genre lists of the 1M README (the 100K one comes from u.genre).
GENRES_1M = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
             "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
             "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
OCCUPATIONS_1M = ("other", "academic/educator", "artist", "clerical/admin",
                  "college/grad student", "customer service",
                  "doctor/health care", "executive/managerial", "farmer",
                  "homemaker", "K-12 student", "lawyer", "programmer", "retired",
                  "sales/marketing", "scientist", "self-employed",
                  "technician/engineer", "tradesman/craftsman", "unemployed",
                  "writer")
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
# where the data comes from, and what each format's directory holds (the
# data's licence forbids shipping it: the user downloads and unpacks it)
DOWNLOAD = "https://grouplens.org/datasets/movielens/"
# format -> (its name on that page, its files: the ratings file first)
FORMAT_FILES = {"100k": ("100K", ("u.data", "u.item", "u.user", "u.genre")),
                "1m": ("1M", ("ratings.dat", "movies.dat", "users.dat")),
                "latest": ("latest(-small)", ("ratings.csv", "movies.csv"))}


DUPLICATES = ("error", "drop")  # config.data.duplicates
# rating range and step of each format
RATING_SCALES = {"100k": (1.0, 5.0, 1.0), "1m": (1.0, 5.0, 1.0),
                 "latest": (0.5, 5.0, 0.5)}
_INTEGER = re.compile(r"^\s*[+-]?\d+\s*$")


class MalformedRowError(DataError):
  """A row of a data file that cannot be parsed; the message names file:line."""

  def __init__(self, path: str, line: int, reason: str):
    super().__init__(f"{path}:{line}: {reason}")
    self.path, self.line = path, line


def where_to_get_it() -> str:
  """The end of every missing-data message: where MovieLens comes from and
  the files of each format."""
  formats = "; ".join(f"{label}: {', '.join(files)}"
                      for label, files in FORMAT_FILES.values())
  return (f"download a MovieLens data set from {DOWNLOAD} and unpack it there "
          f"(the files of one format: {formats})")


def detect_format(data_dir: str) -> str:
  """Returns "100k", "1m" or "latest" from the ratings file in `data_dir`."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"MovieLens data directory not found: {data_dir}; "
                            + where_to_get_it())
  for fmt, (_, files) in FORMAT_FILES.items():
    if os.path.exists(os.path.join(data_dir, files[0])):
      return fmt
  raise FileNotFoundError(
      f"{data_dir} holds no MovieLens ratings file (looked for "
      f"{', '.join(files[0] for _, files in FORMAT_FILES.values())}); "
      + where_to_get_it())


def read_movielens(data_dir: str, duplicates: str = "error",
                   report: dict | None = None) -> tl.UserTimelines:
  """Reads any supported MovieLens directory into UserTimelines; `report`
  (if given) receives {"duplicates_dropped": n}."""
  if duplicates not in DUPLICATES:
    raise ValueError(f"duplicates={duplicates!r} is not one of {DUPLICATES}")
  fmt = detect_format(data_dir)
  reader = {"100k": read_100k, "1m": read_1m, "latest": read_latest}[fmt]
  return reader(data_dir, duplicates, {} if report is None else report)


# ----------------------------------------------------------------------------
# Row parsing helpers.

def _read_rows(path: str, sep: str, num_cols: int, encoding: str,
               holding: str | None, skip_header: bool = False) -> list[list[str]]:
  """Splits a separated file into rows of exactly `num_cols` fields; a file
  without any is a MalformedRowError saying it has no `holding` (e.g.
  "movies"), unless `holding` is None (an optional file may be empty)."""
  text = _read_text(path, encoding)
  if sep == ",":
    rows = list(csv.reader(io.StringIO(text, newline="")))
  else:
    rows = [line.rstrip("\r").split(sep) for line in text.split("\n")]
    if rows and rows[-1] == [""]:
      rows.pop()  # the newline that ends the last line
  first = 1 if skip_header else 0
  if holding and len(rows) <= first:
    raise MalformedRowError(path, first + 1, f"no {holding} in the file")
  for i in range(first, len(rows)):
    if len(rows[i]) != num_cols:
      if not rows[i] or rows[i] == [""]:
        raise MalformedRowError(path, i + 1, "empty line")
      raise MalformedRowError(path, i + 1, f"expected {num_cols} fields "
                              f"separated by {sep!r}, found {len(rows[i])}")
  return rows[first:]


_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32",
         b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _read_text(path: str, encoding: str) -> str:
  """The file decoded with its format's encoding; a file in another one is a
  MalformedRowError naming the line of the first undecodable byte."""
  _check_exists(path)
  with open(path, "rb") as f:
    raw = f.read()
  for bom, name in _BOMS.items():
    if raw.startswith(bom):
      raise MalformedRowError(path, 1, f"the file is {name}; this MovieLens format "
                              f"is {encoding}: re-save it as {encoding}")
  if raw.startswith(b"\xef\xbb\xbf"):
    raw = raw[3:]  # a UTF-8 signature
  try:
    return raw.decode(encoding)
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise MalformedRowError(path, line, f"byte {raw[e.start]:#04x} is not "
                            f"{encoding}, this format's encoding: re-save the "
                            f"file as {encoding}") from None


def _column(rows: list[list[str]], col: int, dtype, path: str, name: str,
            line_offset: int) -> np.ndarray:
  """Converts one column to `dtype` (integers must be written as integers,
  floats must be finite); on failure names the first bad line."""
  values = [r[col] for r in rows]
  integer = np.issubdtype(dtype, np.integer)
  for i, v in enumerate(values):
    if integer and not _INTEGER.match(v):
      raise MalformedRowError(path, i + 1 + line_offset,
                              f"{name} is not an integer: {v!r}")
  try:
    column = np.asarray(values, dtype=np.float64)
  except ValueError:
    for i, v in enumerate(values):
      try:
        float(v)
      except ValueError:
        raise MalformedRowError(path, i + 1 + line_offset,
                                f"{name} is not a number: {v!r}") from None
    raise
  bad = ~np.isfinite(column)
  if bad.any():
    i = int(np.nonzero(bad)[0][0])
    raise MalformedRowError(path, i + 1 + line_offset,
                            f"{name} is not finite: {values[i]!r}")
  return (np.asarray(values, dtype=np.int64) if integer else column).astype(dtype)


def _events(rows, path: str, line_offset: int, fmt: str, item_ids: np.ndarray,
            user_ids: np.ndarray | None, duplicates: str, report: dict):
  """(user_raw, item_raw, ratings, timestamps) columns of a ratings file,
  every field checked against the format (see the module docstring)."""
  names = ("user id", "item id", "rating", "timestamp")
  dtypes = (np.int64, np.int64, np.float32, np.int64)
  users, items, ratings, times = (_column(rows, c, d, path, n, line_offset)
                                  for c, (d, n) in enumerate(zip(dtypes, names)))
  low, high, step = RATING_SCALES[fmt]
  off_scale = (ratings < low) | (ratings > high) | (np.mod(ratings, step) != 0)
  checks = ((off_scale, lambda i: f"rating {rows[i][2]!r} is not one of "
             f"{low:g}..{high:g} in steps of {step:g}"),
            (times < 0, lambda i: f"timestamp {times[i]} is negative"),
            (~np.isin(items, item_ids), lambda i: f"item id {items[i]} is not in "
             "the items file"))
  if user_ids is not None:
    checks += ((~np.isin(users, user_ids), lambda i: f"user id {users[i]} is not "
                "in the users file"),)
  for bad, reason in checks:
    if bad.any():
      i = int(np.nonzero(bad)[0][0])
      raise MalformedRowError(path, i + 1 + line_offset, reason(i))
  keep = _first_ratings(users, items, path, line_offset, duplicates)
  report["duplicates_dropped"] = int((~keep).sum())
  return users[keep], items[keep], ratings[keep], times[keep]


def _first_ratings(users, items, path, line_offset, duplicates: str) -> np.ndarray:
  """[rows] bool, True at each (user, item) pair's first rating; a repeat is
  an error naming its line unless `duplicates="drop"`."""
  pairs = users.astype(np.int64) * (int(items.max()) + 1) + items
  _, first = np.unique(pairs, return_index=True)
  keep = np.zeros(len(pairs), bool)
  keep[first] = True
  if duplicates == "error" and not keep.all():
    i = int(np.nonzero(~keep)[0][0])
    raise MalformedRowError(
        path, i + 1 + line_offset, f"user {users[i]} rated item {items[i]} again "
        "(a duplicate row); set config.data.duplicates='drop' to keep the first")
  return keep


def _check_exists(path: str) -> None:
  """A FileNotFoundError naming a missing file of its format, and where to get it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"MovieLens file not found: {path}; "
                            + where_to_get_it())


def _users_with_events(users: tl.UserTable, event_users: np.ndarray,
                       report: dict) -> tl.UserTable:
  """The users of the users file who rated something (a user without events
  has nothing to train on or predict); how many were left out goes to
  `report["users_without_events"]`."""
  rated = np.isin(users.raw_ids, event_users)
  report["users_without_events"] = int((~rated).sum())
  return users.subset(rated)


def _split_title(raw_title: str) -> tuple[str, int]:
  """'Toy Story (1995)' -> ('Toy Story', 1995); no year -> (title, 0)."""
  match = _TITLE_YEAR.match(raw_title.strip())
  if match:
    return match.group(1), int(match.group(2))
  return raw_title.strip(), 0


def _item_table(raw_ids, raw_titles, genres, genre_names, tags=None):
  titles, years = zip(*(_split_title(t) for t in raw_titles)) if raw_titles else ((), ())
  pad = lambda arr, value, dtype: np.concatenate(  # noqa: E731
      [np.array([value], dtype), np.asarray(arr, dtype)])
  return tl.ItemTable(
      raw_ids=pad(raw_ids, 0, np.int64),
      titles=pad(titles, "", object),
      years=pad(years, 0, np.int32),
      genres=np.concatenate([np.zeros((1, len(genre_names)), bool),
                             np.asarray(genres, bool).reshape(-1, len(genre_names))]),
      genre_names=tuple(genre_names),
      tags=None if tags is None else _object_column([()] + list(tags)))


def _object_column(values: list) -> np.ndarray:
  """A 1-D object array holding `values` as they are (tuples stay elements)."""
  out = np.empty(len(values), object)
  for i, value in enumerate(values):
    out[i] = value
  return out


def _check_unique(ids: np.ndarray, path: str, what: str):
  uniq, counts = np.unique(ids, return_counts=True)
  if np.any(counts > 1):
    line = int(np.nonzero(ids == uniq[counts > 1][0])[0][1]) + 1
    raise MalformedRowError(path, line, f"duplicate {what} id {uniq[counts > 1][0]}")


# ----------------------------------------------------------------------------
# MovieLens 100K.

def read_100k(data_dir: str, duplicates: str = "error",
              report: dict | None = None) -> tl.UserTimelines:
  """Reads MovieLens 100K (`u.data`, `u.item`, `u.user`, `u.genre`)."""
  enc = "latin-1"
  genre_names = [r[0] for r in _read_genre_file(data_dir)]

  item_path = os.path.join(data_dir, "u.item")
  item_rows = _read_rows(item_path, "|", 5 + len(genre_names), enc, "movies")
  item_ids = _column(item_rows, 0, np.int64, item_path, "movie id", 0)
  _check_unique(item_ids, item_path, "movie")
  flags = np.stack([_column(item_rows, 5 + g, np.int64, item_path, "genre flag", 0)
                    for g in range(len(genre_names))], axis=1)
  items = _item_table(item_ids, [r[1] for r in item_rows], flags > 0, genre_names)

  user_path = os.path.join(data_dir, "u.user")
  user_rows = _read_rows(user_path, "|", 5, enc, "users")
  user_ids = _column(user_rows, 0, np.int64, user_path, "user id", 0)
  _check_unique(user_ids, user_path, "user")
  users = tl.UserTable(
      raw_ids=user_ids,
      ages=_column(user_rows, 1, np.int32, user_path, "age", 0),
      genders=np.array([r[2] for r in user_rows], object),
      occupations=np.array([r[3] for r in user_rows], object),
      zip_codes=np.array([r[4] for r in user_rows], object))

  data_path = os.path.join(data_dir, "u.data")
  rows = _read_rows(data_path, "\t", 4, enc, "ratings")
  report = {} if report is None else report
  events = _events(rows, data_path, 0, "100k", item_ids, user_ids, duplicates,
                   report)
  return tl.from_events("movielens_100k", *events, items=items,
                        users=_users_with_events(users, events[0], report),
                        source=data_path)


def _read_genre_file(data_dir: str) -> list[list[str]]:
  """u.genre rows 'name|index', in index order; a trailing blank line is allowed."""
  path = os.path.join(data_dir, "u.genre")
  _check_exists(path)
  with open(path, encoding="latin-1") as f:
    lines = [line.rstrip("\r\n") for line in f]
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise MalformedRowError(path, 1, "no genres in the file (expected one "
                            "'name|index' line per genre, from 'unknown|0')")
  rows = []
  for i, line in enumerate(lines):
    parts = line.split("|")
    if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) != i:
      raise MalformedRowError(path, i + 1, f"expected 'name|{i}', found {line!r}")
    rows.append(parts)
  return rows


# ----------------------------------------------------------------------------
# MovieLens 1M.

def read_1m(data_dir: str, duplicates: str = "error",
            report: dict | None = None) -> tl.UserTimelines:
  """Reads MovieLens 1M (`ratings.dat`, `movies.dat`, `users.dat`)."""
  enc = "latin-1"
  movie_path = os.path.join(data_dir, "movies.dat")
  movie_rows = _read_rows(movie_path, "::", 3, enc, "movies")
  movie_ids = _column(movie_rows, 0, np.int64, movie_path, "movie id", 0)
  _check_unique(movie_ids, movie_path, "movie")
  genres = _multi_hot([r[2] for r in movie_rows], GENRES_1M, movie_path)
  items = _item_table(movie_ids, [r[1] for r in movie_rows], genres, GENRES_1M)

  user_path = os.path.join(data_dir, "users.dat")
  user_rows = _read_rows(user_path, "::", 5, enc, "users")
  user_ids = _column(user_rows, 0, np.int64, user_path, "user id", 0)
  _check_unique(user_ids, user_path, "user")
  occupation_codes = _column(user_rows, 3, np.int64, user_path, "occupation", 0)
  if occupation_codes.min() < 0 or occupation_codes.max() >= len(OCCUPATIONS_1M):
    bad = int(np.nonzero((occupation_codes < 0) |
                         (occupation_codes >= len(OCCUPATIONS_1M)))[0][0])
    raise MalformedRowError(user_path, bad + 1,
                            f"occupation code {occupation_codes[bad]} is not 0..20")
  users = tl.UserTable(
      raw_ids=user_ids,
      ages=_column(user_rows, 2, np.int32, user_path, "age", 0),
      genders=np.array([r[1] for r in user_rows], object),
      occupations=np.array([OCCUPATIONS_1M[c] for c in occupation_codes], object),
      zip_codes=np.array([r[4] for r in user_rows], object))

  rating_path = os.path.join(data_dir, "ratings.dat")
  rows = _read_rows(rating_path, "::", 4, enc, "ratings")
  report = {} if report is None else report
  events = _events(rows, rating_path, 0, "1m", movie_ids, user_ids, duplicates,
                   report)
  return tl.from_events("movielens_1m", *events, items=items,
                        users=_users_with_events(users, events[0], report),
                        source=rating_path)


def _multi_hot(genre_fields: list[str], genre_names, path: str) -> np.ndarray:
  """'Action|Comedy' strings -> [n, len(genre_names)] bool; unknown genre errors."""
  index = {g: i for i, g in enumerate(genre_names)}
  out = np.zeros((len(genre_fields), len(genre_names)), bool)
  for row, field in enumerate(genre_fields):
    for genre in field.split("|"):
      if genre == "(no genres listed)":
        continue
      if genre not in index:
        raise MalformedRowError(path, row + 1, f"unknown genre {genre!r}")
      out[row, index[genre]] = True
  return out


# ----------------------------------------------------------------------------
# MovieLens latest / latest-small.

def read_latest(data_dir: str, duplicates: str = "error",
                report: dict | None = None) -> tl.UserTimelines:
  """Reads MovieLens latest(-small): ratings.csv, movies.csv, optional tags.csv."""
  movie_path = os.path.join(data_dir, "movies.csv")
  movie_rows = _read_rows(movie_path, ",", 3, "utf-8", "movies", skip_header=True)
  movie_ids = _column(movie_rows, 0, np.int64, movie_path, "movieId", 1)
  _check_unique(movie_ids, movie_path, "movie")
  genre_names = sorted({g for r in movie_rows for g in r[2].split("|")}
                       - {"(no genres listed)"})
  genres = _multi_hot([r[2] for r in movie_rows], genre_names, movie_path)

  tags = None
  tag_path = os.path.join(data_dir, "tags.csv")
  if os.path.exists(tag_path):
    tags = _item_tags(tag_path, movie_ids)
  items = _item_table(movie_ids, [r[1] for r in movie_rows], genres, genre_names,
                      tags)

  rating_path = os.path.join(data_dir, "ratings.csv")
  rows = _read_rows(rating_path, ",", 4, "utf-8", "ratings", skip_header=True)
  events = _events(rows, rating_path, 1, "latest", movie_ids, None, duplicates,
                   {} if report is None else report)
  return tl.from_events("movielens_latest", *events, items=items,
                        source=rating_path)


def _item_tags(tag_path: str, movie_ids: np.ndarray) -> list[tuple[str, ...]]:
  """Per movie (in movie_ids order), its distinct tags, most used first."""
  rows = _read_rows(tag_path, ",", 4, "utf-8", None, skip_header=True)
  tagged = _column(rows, 1, np.int64, tag_path, "movieId", 1)
  row_of = {m: i for i, m in enumerate(movie_ids.tolist())}
  counts: list[dict[str, int]] = [{} for _ in movie_ids]
  for line, (movie, row) in enumerate(zip(tagged.tolist(), rows)):
    if movie not in row_of:
      raise MalformedRowError(tag_path, line + 2, f"movieId {movie} is not in "
                              "movies.csv")
    tag = row[2].strip()
    if tag:
      bucket = counts[row_of[movie]]
      bucket[tag] = bucket.get(tag, 0) + 1
  return [tuple(sorted(c, key=lambda t: (-c[t], t))) for c in counts]
