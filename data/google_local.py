"""Google Local Data (2021, the McAuley lab's release) into `UserTimelines`.

Source: https://mcauleylab.ucsd.edu/public_datasets/gdrive/googlelocal/
(mirror: https://datarepo.eng.ucsd.edu/mcauley_group/gdrive/googlelocal/;
described at https://jiachengli1995.github.io/google/index.html), reviews of
businesses on Google Maps in the US up to September 2021, one file pair per
state; the format as described there and in published analyses of the files.
One folder (`config.data.dir`) holds, for a region (`config.data.region`,
e.g. "Hawaii", or "Hawaii_10" for the release's 10-core subset):

- `review-<region>.json[.gz]`: one JSON object a line, `user_id` (a 21-digit
  string), `name` (the reviewer's), `time` (unix milliseconds), `rating`
  (1..5), `text` (may be null), `pics`, `resp` (the business's reply), and
  `gmap_id` (the business, e.g. "0x7c006df045b01715:0xe945c308688e1a46");
- `meta-<state>.json[.gz]` (the state without `_10`): one business a line,
  `gmap_id`, `name` (the business's: the item title), `address`,
  `description`, `latitude`, `longitude`, `category` (a list such as
  ["Ramen restaurant"], or null), `avg_rating`, `num_of_reviews`, `price`,
  `hours`, `MISC`, `state`, `relative_results`, `url`.

Items are businesses titled by their name; their `category` lists give the
genre table (the `num_categories` most frequent). Timestamps become unix
seconds (events first ordered by the milliseconds). Duplicates, businesses
missing from the metadata, ids and streaming: data/review_events.py.
"""

from __future__ import annotations

from collections.abc import Container
import os

from data import download
from data import review_events as rev
from data import timelines as tl

SITE = "https://mcauleylab.ucsd.edu/public_datasets/gdrive/googlelocal/"
MILLISECONDS = 1000


def hint(region: str, data_dir: str) -> str:
  return (f"fetch them with `{download.command('google_local:' + region, data_dir)}`"
          f" (the release: {SITE})")


def state_of(region: str) -> str:
  """The metadata file's state of a region: "Hawaii_10" -> "Hawaii"."""
  return region[:-len("_10")] if region.endswith("_10") else region


def read_google_local(data_dir: str, region: str, duplicates: str = "error",
                      num_categories: int = rev.DEFAULT_NUM_CATEGORIES,
                      report: dict | None = None) -> tl.UserTimelines:
  """Reads one region's reviews and business metadata from `data_dir`."""
  rev.check_duplicates_policy(duplicates)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"Google Local directory not found: {data_dir}; "
                            + hint(region, data_dir))
  suffixes = (".json", ".json.gz")
  reviews = rev.find_file(data_dir, (f"review-{region}",), suffixes,
                          f"the {region} review file", hint(region, data_dir))
  metadata = rev.find_file(data_dir, (f"meta-{state_of(region)}",), suffixes,
                           f"the {state_of(region)} business metadata file",
                           hint(region, data_dir))
  log = rev.read_json_reviews(reviews, "user_id", "gmap_id", "rating", "time")
  catalogue = _read_metadata(metadata, log.item_codes)
  return rev.build_timelines(f"google_local_{region}", log, catalogue, duplicates,
                             num_categories, {} if report is None else report,
                             time_divisor=MILLISECONDS)


def _read_metadata(path: str, wanted: Container[str]) -> dict:
  """{gmap_id: (name, categories)} for the `wanted` businesses; one listed
  twice keeps its first record."""
  catalogue = {}
  for line, record in rev.json_records(path):
    item = rev.id_field(record, "gmap_id", path, line)
    name = rev.optional_text(record, "name", path, line)
    categories = rev.string_list(record, "category", path, line)
    if item in wanted and item not in catalogue:
      catalogue[item] = (name, categories)
  return catalogue
