"""Amazon Reviews 2023 (the McAuley lab's release) into `UserTimelines`.

Source: https://amazon-reviews-2023.github.io/ (files under
https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/); the format as
checked against the lab's own code (github.com/hyp1231/AmazonReviews2023:
benchmark_scripts/kcore_filtering.py, last_out_split.py,
seq_rec_results/dataset/process_amazon_2023.py) and published examples of
its records. One folder (`config.data.dir`) holds, per category (e.g.
`All_Beauty`; `CATEGORIES`):

- `<Category>.jsonl[.gz]`, the reviews (raw/review_categories/), one JSON
  object a line: `rating` (1.0..5.0), `title` and `text` (the review's),
  `images`, `asin` (the variant), `parent_asin` (the product),
  `user_id`, `timestamp` (unix milliseconds), `helpful_vote`,
  `verified_purchase`;
- `meta_<Category>.jsonl[.gz]`, the items (raw/meta_categories/):
  `parent_asin`, `title`, `main_category`, `categories` (a list, often empty,
  e.g. ["Beauty & Personal Care", "Skin Care", "Lip Care"]), `average_rating`,
  `rating_number`, `features`, `description`, `price`, `images`, `videos`,
  `store`, `details`, `bought_together`;
- optionally the benchmark files (`benchmark/<k>core/<split>/` as on the
  server, k = 0 or 5): `rating_only/<Category>.csv` or, for the splits
  `last_out`, `timestamp`, `last_out_w_his`, `timestamp_w_his`,
  `<Category>.{train,valid,test}.csv` (`.csv.gz` as downloaded): a header
  `user_id,parent_asin,rating,timestamp` (`,history` in the `_w_his` ones:
  the space-separated items before, not read) and one review a line, the
  lab's repeated reviews already removed and k-core filtered.

`config.data.events` picks the events: "reviews" (the review file) or a
benchmark variant such as "5core/last_out_w_his" (`EVENTS`); the union of a
split's three files is every event of the variant (which events a workflow
holds out is its own split: leave-last-out is the benchmark's `last_out`).
Either way the items are the reviewed products (`parent_asin`, the key of
the metadata and of the benchmark), titled from the metadata file; their
categories (`main_category` and every level of `categories`) give the genre
table over the `num_categories` most frequent. Timestamps become unix
seconds (events first ordered by the milliseconds). The data have no user
demographics and no release years (0). The rest (reading, duplicates, items
without metadata, ids) is data/review_events.py's.
"""

from __future__ import annotations

from collections.abc import Container
import os

from data import download
from data import review_events as rev
from data import timelines as tl
from data.movielens import MalformedRowError

SITE = "https://amazon-reviews-2023.github.io/"
CATEGORIES = (
    "All_Beauty", "Amazon_Fashion", "Appliances", "Arts_Crafts_and_Sewing",
    "Automotive", "Baby_Products", "Beauty_and_Personal_Care", "Books",
    "CDs_and_Vinyl", "Cell_Phones_and_Accessories", "Clothing_Shoes_and_Jewelry",
    "Digital_Music", "Electronics", "Gift_Cards", "Grocery_and_Gourmet_Food",
    "Handmade_Products", "Health_and_Household", "Health_and_Personal_Care",
    "Home_and_Kitchen", "Industrial_and_Scientific", "Kindle_Store",
    "Magazine_Subscriptions", "Movies_and_TV", "Musical_Instruments",
    "Office_Products", "Patio_Lawn_and_Garden", "Pet_Supplies", "Software",
    "Sports_and_Outdoors", "Subscription_Boxes", "Tools_and_Home_Improvement",
    "Toys_and_Games", "Video_Games")
SPLITS = ("last_out", "timestamp", "last_out_w_his", "timestamp_w_his")
EVENTS = ("reviews",) + tuple(f"{k}core/{split}" for k in (5, 0)
                              for split in ("rating_only",) + SPLITS)
SPLIT_PARTS = ("train", "valid", "test")
HEADER = ("user_id", "parent_asin", "rating", "timestamp")
MILLISECONDS = 1000


def hint(category: str, data_dir: str, events: str = "reviews") -> str:
  """The end of a missing-file message: the command that fetches the files."""
  extra = "" if events == "reviews" else f" --benchmark {events}"
  return (f"fetch them with `{download.command('amazon2023:' + category, data_dir)}"
          f"{extra}` (the release: {SITE})")


def read_amazon(data_dir: str, category: str, events: str = "reviews",
                duplicates: str = "error",
                num_categories: int = rev.DEFAULT_NUM_CATEGORIES,
                report: dict | None = None) -> tl.UserTimelines:
  """Reads one category's events and item metadata from `data_dir`; `report`
  (if given) receives the counts of duplicates dropped and untitled items."""
  rev.check_duplicates_policy(duplicates)
  if events not in EVENTS:
    raise ValueError(f"events={events!r} is not one of {EVENTS}")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"Amazon Reviews 2023 directory not found: "
                            f"{data_dir}; " + hint(category, data_dir, events))
  if events == "reviews":
    log = _read_reviews(_review_file(data_dir, category))
  else:
    log = _read_benchmark(data_dir, category, events)
  catalogue = _read_metadata(_metadata_file(data_dir, category),
                             log.item_codes)
  report = {} if report is None else report
  return rev.build_timelines(f"amazon2023_{category}", log, catalogue, duplicates,
                             num_categories, report, time_divisor=MILLISECONDS)


def _review_file(data_dir: str, category: str) -> str:
  return rev.find_file(data_dir, (category,), (".jsonl", ".jsonl.gz"),
                       f"the {category} review file", hint(category, data_dir))


def _metadata_file(data_dir: str, category: str) -> str:
  return rev.find_file(data_dir, (f"meta_{category}",), (".jsonl", ".jsonl.gz"),
                       f"the {category} item metadata file",
                       hint(category, data_dir))


def _read_reviews(path: str) -> rev.EventLog:
  return rev.read_json_reviews(path, "user_id", "parent_asin", "rating",
                               "timestamp")


def benchmark_files(data_dir: str, category: str, events: str) -> list[str]:
  """The benchmark variant's CSV files (one for rating_only, else train,
  valid and test), each `.csv` or `.csv.gz`."""
  folder = os.path.join(data_dir, "benchmark", *events.split("/"))
  stems = ((category,) if events.endswith("rating_only") else
           tuple(f"{category}.{part}" for part in SPLIT_PARTS))
  return [rev.find_file(folder, (stem,), (".csv", ".csv.gz"),
                        f"the {events} benchmark file",
                        hint(category, data_dir, events)) for stem in stems]


def _read_benchmark(data_dir: str, category: str, events: str) -> rev.EventLog:
  paths = benchmark_files(data_dir, category, events)
  log = rev.EventLog(paths[0] if len(paths) == 1 else os.path.join(
      os.path.dirname(paths[0]), f"{category}.{{{','.join(SPLIT_PARTS)}}}.csv"),
                     paths)
  for path in paths:
    log.read_from(path)
    _read_benchmark_csv(path, log)
  return log


def _read_benchmark_csv(path: str, log: rev.EventLog) -> None:
  """Adds one benchmark CSV's rows to `log` (its header checked)."""
  lines = rev.text_lines(path)
  first = next(lines, None)
  header = tuple(first[1].split(",")) if first else ()
  if header not in (HEADER, HEADER + ("history",)):
    raise MalformedRowError(path, first[0] if first else 1, "expected the header "
                            f"{','.join(HEADER)}[,history], found "
                            f"{first[1][:80] if first else 'an empty file'!r}")
  width = len(header)
  for line, text in lines:
    fields = text.split(",")
    if len(fields) != width:
      raise MalformedRowError(path, line, f"expected {width} fields separated by "
                              f"',', found {len(fields)}")
    record = dict(zip(header, fields))
    log.add(rev.id_field(record, "user_id", path, line),
            rev.id_field(record, "parent_asin", path, line),
            rev.rating_field(record, "rating", path, line),
            _integer(record, "timestamp", path, line), line)


def _integer(record: dict, key: str, path: str, line: int) -> int:
  text = record[key].strip()
  if not text.isdigit():
    raise MalformedRowError(path, line, f"field {key!r} ({text[:40]!r}) must be a "
                            "non-negative integer")
  return int(text)


def _read_metadata(path: str, wanted: Container[str]) -> dict:
  """{parent_asin: (title, categories)} for the `wanted` items; a product
  listed twice keeps its first record."""
  catalogue = {}
  for line, record in rev.json_records(path):
    item = rev.id_field(record, "parent_asin", path, line)
    title = rev.optional_text(record, "title", path, line)
    main = rev.optional_text(record, "main_category", path, line).strip()
    categories = rev.string_list(record, "categories", path, line)
    if item in wanted and item not in catalogue:
      catalogue[item] = (title, tuple(dict.fromkeys(((main,) if main else ())
                                                    + categories)))
  return catalogue
