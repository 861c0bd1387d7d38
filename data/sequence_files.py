"""The sequence files of the SASRec / BERT4Rec / gSASRec literature into
`UserTimelines`.

Format (github.com/kang205/SASRec: README "Datasets", util.data_partition,
data/DataProcessing.py): one interaction a line, `<user id> <item id>`,
integers from 1 separated by a space, each user's lines in time order
(SASRec's preprocessing sorts a user's reviews by time and writes them user
by user); e.g. `ml-1m.txt`, `Beauty.txt`, `Steam.txt`, `Video.txt`. The
files hold no times, ratings or titles.

Mapping: users and items keep their integer ids as raw ids; an event's
timestamp is its position in the user's sequence (0, 1, 2, ...: the order is
all the file says); ratings are 0 (none: implicit feedback). A (user, item)
pair listed twice is the `config.data.duplicates` policy ("drop" keeps the
first). Without an item map the items have no titles ("") and no categories
(a genre table of width 0): the next-item and federated workflows run (they
read items only); the text workflows (user_llm, federated_llm, rlpf) need
titles, ratings and categories, and `sources.require_item_text` is their
one-line ConfigError naming config.data.item_map.

Item map (optional, `config.data.item_map`, a file beside the sequence
file): the id map back to a catalogue, written by whoever remapped the ids
(SASRec's DataProcessing.py keeps its `itemmap` in memory only): tab-separated
with the header `item_id<TAB>title` or `item_id<TAB>title<TAB>categories`,
one item a line, categories separated by '|'. Items of the sequence file it
lacks are titled by their id and counted; its categories give the genre
table (the `num_categories` most frequent).
"""

from __future__ import annotations

import os

from data import review_events as rev
from data import timelines as tl
from data.movielens import MalformedRowError

SITE = "https://github.com/kang205/SASRec"
MAP_HEADERS = (("item_id", "title"), ("item_id", "title", "categories"))
WHERE = (f"sequence files come with the papers' code (e.g. {SITE}/tree/master/"
         "data): put the file there")


def read_sequence_file(data_dir: str, file: str, item_map: str = "",
                       duplicates: str = "error",
                       num_categories: int = rev.DEFAULT_NUM_CATEGORIES,
                       report: dict | None = None) -> tl.UserTimelines:
  """Reads `data_dir/file` (and the item map `data_dir/item_map`, if named)."""
  rev.check_duplicates_policy(duplicates)
  path = os.path.join(data_dir, file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"sequence file not found: {path}; {WHERE}")
  log = rev.EventLog(path)
  positions: dict[str, int] = {}
  for line, text in rev.text_lines(path):
    user, item = _pair(text, path, line)
    position = positions.get(user, 0)
    positions[user] = position + 1
    log.add(user, item, 0.0, position, line)
  catalogue = None
  if item_map:
    map_path = os.path.join(data_dir, item_map)
    if not os.path.isfile(map_path):
      raise FileNotFoundError(f"item map not found: {map_path} (config.data."
                              "item_map; '' reads the sequence file alone)")
    catalogue = _read_item_map(map_path)
  name = "sequence_file_" + os.path.splitext(os.path.basename(file))[0]
  return rev.build_timelines(name, log, catalogue, duplicates, num_categories,
                             {} if report is None else report, integer_ids=True,
                             what="interactions")


def _pair(text: str, path: str, line: int) -> tuple[str, str]:
  """'12 345' -> ('12', '345'), both integers >= 1."""
  fields = text.split()
  if len(fields) != 2:
    raise MalformedRowError(path, line, "expected '<user id> <item id>', found "
                            f"{len(fields)} fields")
  for name, value in zip(("user id", "item id"), fields):
    if not value.isdigit() or int(value) < 1:
      raise MalformedRowError(path, line, f"{name} {value[:40]!r} is not an "
                              "integer >= 1")
  return str(int(fields[0])), str(int(fields[1]))


def _read_item_map(path: str) -> dict:
  """{item id (str): (title, categories)} from an item map file."""
  lines = rev.text_lines(path)
  first = next(lines, None)
  header = tuple(first[1].split("\t")) if first else ()
  if header not in MAP_HEADERS:
    raise MalformedRowError(path, first[0] if first else 1, "expected the header "
                            "item_id<TAB>title[<TAB>categories], found "
                            f"{first[1][:80] if first else 'an empty file'!r}")
  catalogue = {}
  for line, text in lines:
    fields = text.split("\t")
    if len(fields) != len(header):
      raise MalformedRowError(path, line, f"expected {len(header)} fields "
                              f"separated by tabs, found {len(fields)}")
    item = fields[0].strip()
    if not item.isdigit() or int(item) < 1:
      raise MalformedRowError(path, line, f"item_id {item[:40]!r} is not an "
                              "integer >= 1")
    if str(int(item)) in catalogue:
      raise MalformedRowError(path, line, f"item_id {item} is listed twice")
    categories = fields[2].split("|") if len(fields) == 3 else []
    catalogue[str(int(item))] = (fields[1], tuple(dict.fromkeys(
        c.strip() for c in categories if c.strip())))
  return catalogue
