"""The Yelp Open Dataset into `UserTimelines`.

Source: https://www.yelp.com/dataset (after accepting Yelp's Dataset User
Agreement there: non-commercial, academic use; no redistribution), a tar of
JSON Lines files; the format as Yelp's documentation gives it
(https://www.yelp.com/dataset/documentation/main). One folder
(`config.data.dir`) holds:

- `yelp_academic_dataset_review.json` (or `review.json`; `.gz` too): one
  review a line, `review_id`, `user_id`, `business_id` (22-character
  strings), `stars` (1..5, written 3.0 in the files), `useful`, `funny`,
  `cool`, `text`, `date` ("2018-07-07 22:09:11", read as UTC);
- `yelp_academic_dataset_business.json` (or `business.json`): one business a
  line, `business_id`, `name` (the item title), `address`, `city`, `state`,
  `postal_code`, `latitude`, `longitude`, `stars`, `review_count`,
  `is_open`, `attributes`, `categories` (ONE comma-separated string,
  "Doctors, Traditional Chinese Medicine", or null), `hours`.

Items are businesses titled by their name; their categories give the genre
table (the `num_categories` most frequent). Duplicates, businesses missing
from the business file, ids and streaming: data/review_events.py. There is
no download command: Yelp hands the data out after its form.
"""

from __future__ import annotations

from collections.abc import Container
import datetime
import os
import re

from data import review_events as rev
from data import timelines as tl
from data.movielens import MalformedRowError

SITE = "https://www.yelp.com/dataset"
_DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
WHERE = (f"download the Yelp Open Dataset from {SITE} (after its form and "
         "Dataset User Agreement) and unpack the tar there")


def read_yelp(data_dir: str, duplicates: str = "error",
              num_categories: int = rev.DEFAULT_NUM_CATEGORIES,
              report: dict | None = None) -> tl.UserTimelines:
  """Reads the reviews and businesses of a Yelp Open Dataset folder."""
  rev.check_duplicates_policy(duplicates)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"Yelp directory not found: {data_dir}; {WHERE}")
  suffixes = (".json", ".json.gz")
  reviews = rev.find_file(data_dir, ("yelp_academic_dataset_review", "review"),
                          suffixes, "the Yelp review file", WHERE)
  businesses = rev.find_file(data_dir, ("yelp_academic_dataset_business",
                                        "business"), suffixes,
                             "the Yelp business file", WHERE)
  log = rev.EventLog(reviews)
  for line, record in rev.json_records(reviews):
    log.add(rev.id_field(record, "user_id", reviews, line),
            rev.id_field(record, "business_id", reviews, line),
            rev.rating_field(record, "stars", reviews, line),
            unix_time(record, reviews, line), line)
  catalogue = _read_businesses(businesses, log.item_codes)
  return rev.build_timelines("yelp", log, catalogue, duplicates, num_categories,
                             {} if report is None else report)


def unix_time(record: dict, path: str, line: int) -> int:
  """The review's `date` ("YYYY-MM-DD HH:MM:SS", UTC) in unix seconds."""
  value = record.get("date")
  try:
    if not _DATE.fullmatch(value):
      raise ValueError(value)
    moment = datetime.datetime.fromisoformat(value)
  except (TypeError, ValueError):
    raise MalformedRowError(path, line, f"field 'date' ({value!r}) is not a "
                            "date 'YYYY-MM-DD HH:MM:SS'") from None
  return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp())


def _read_businesses(path: str, wanted: Container[str]) -> dict:
  """{business_id: (name, categories)} for the `wanted` businesses; one
  listed twice keeps its first record."""
  catalogue = {}
  for line, record in rev.json_records(path):
    item = rev.id_field(record, "business_id", path, line)
    name = rev.optional_text(record, "name", path, line)
    categories = rev.optional_text(record, "categories", path, line)
    if item in wanted and item not in catalogue:
      catalogue[item] = (name, tuple(dict.fromkeys(
          c.strip() for c in categories.split(",") if c.strip())))
  return catalogue
