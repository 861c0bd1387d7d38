"""The review and sequence-file readers (Amazon Reviews 2023, Google Local,
Yelp, SASRec-style files) on fixtures written in each release's format
(tests/data/datasets/), their quirks and errors; the download command against
a local HTTP server on 127.0.0.1 (nothing here reaches the internet); the
configs; and a tiny next-item run on the Amazon fixture."""

import datetime
import gzip
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile

import ml_collections
import numpy as np
import pytest

from conftest import REPO, ConfigReads, run_workflow
from data import (amazon, download, google_local, movielens, review_events,
                  sequence_files, sources, yelp)
from infra.errors import ConfigError, DataError

FIXTURES = os.path.join(REPO, "tests", "data", "datasets")
AMAZON = os.path.join(FIXTURES, "amazon2023")
GOOGLE = os.path.join(FIXTURES, "google_local")
YELP = os.path.join(FIXTURES, "yelp")
SEQUENCES = os.path.join(FIXTURES, "sequence_files")


def records(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def gzip_file(source, dest):
  with open(source, "rb") as f, gzip.open(dest, "wb") as out:
    out.write(f.read())


def copy_amazon(tmp_path, compress=False):
  """The Amazon fixture's review and metadata files in tmp_path (gzipped as
  released when `compress`)."""
  for name in ("All_Beauty.jsonl", "meta_All_Beauty.jsonl"):
    source = os.path.join(AMAZON, name)
    if compress:
      gzip_file(source, tmp_path / (name + ".gz"))
    else:
      shutil.copy(source, tmp_path / name)
  return tmp_path


def same_events(a, b):
  return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in (
      "user_offsets", "item_ids", "ratings", "timestamps"))


# --- Amazon Reviews 2023 ------------------------------------------------------

def test_amazon_reviews_become_timelines_with_titles_and_categories():
  report = {}
  data = amazon.read_amazon(AMAZON, "All_Beauty", duplicates="drop", report=report)
  reviews = records(os.path.join(AMAZON, "All_Beauty.jsonl"))
  meta = {m["parent_asin"]: m for m in records(
      os.path.join(AMAZON, "meta_All_Beauty.jsonl"))}
  assert data.name == "amazon2023_All_Beauty"
  assert (data.num_users, data.num_items, data.num_events) == (24, 25, 157)
  assert len(reviews) == 158 and report == {"duplicates_dropped": 1,
                                            "items_without_title": 2}
  # string ids: raw ids 1..N in sorted order, the ASINs kept beside them
  items = data.items
  assert items.raw_ids.tolist() == list(range(26))
  assert items.source_ids[1:].tolist() == sorted({r["parent_asin"] for r in reviews})
  assert data.users.source_ids.tolist() == sorted({r["user_id"] for r in reviews})
  title = dict(zip(items.source_ids, items.titles))
  for asin, record in meta.items():
    if asin in title and record["title"]:
      assert title[asin] == " ".join(record["title"].split())  # non-ASCII kept
  assert "Tsubaki 椿 Camellia Hair Oil" in title.values()
  assert "Vitamin C Serum 20% with Hyaluronic Acid" in title.values()
  # the product missing from the metadata and the one with an empty title:
  # kept, titled by their ASIN
  untitled = {a for a in title if a and (a not in meta or not meta[a]["title"])}
  assert len(untitled) == 2 and all(title[a] == a for a in untitled)
  # categories: main_category and every level of `categories`, top 20
  assert len(items.genre_names) == review_events.DEFAULT_NUM_CATEGORIES
  assert items.genre_names[:3] == ("All Beauty", "Beauty & Personal Care",
                                   "Skin Care")
  genres = dict(zip(items.source_ids, items.genres))
  for asin, record in meta.items():
    if asin in genres:
      expected = {record["main_category"], *record["categories"]}
      assert {items.genre_names[j] for j in np.nonzero(genres[asin])[0]} == (
          expected & set(items.genre_names))
  # timestamps: milliseconds -> seconds, each user's events in time order
  user = int(np.nonzero(data.users.source_ids == reviews[0]["user_id"])[0][0])
  mine = sorted((r["timestamp"], r["parent_asin"]) for r in reviews
                if r["user_id"] == reviews[0]["user_id"])
  events = slice(data.user_offsets[user], data.user_offsets[user + 1])
  assert data.timestamps[events].tolist() == [t // 1000 for t, _ in mine]
  assert items.source_ids[data.item_ids[events]].tolist() == [a for _, a in mine]


def test_amazon_gzip_files_as_released_read_the_same(tmp_path):
  plain = amazon.read_amazon(AMAZON, "All_Beauty", duplicates="drop")
  packed = amazon.read_amazon(str(copy_amazon(tmp_path, compress=True)),
                              "All_Beauty", duplicates="drop")
  assert same_events(plain, packed)
  assert packed.items.titles.tolist() == plain.items.titles.tolist()


def test_a_repeated_review_names_both_lines_or_keeps_the_earliest(tmp_path):
  path = os.path.join(AMAZON, "All_Beauty.jsonl")
  with pytest.raises(movielens.MalformedRowError) as error:
    amazon.read_amazon(AMAZON, "All_Beauty")
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  line = error.value.line
  repeat = json.loads(lines[line - 1])
  first = next(i + 1 for i, text in enumerate(lines) if text and i + 1 != line
               and (json.loads(text)["user_id"], json.loads(text)["parent_asin"])
               == (repeat["user_id"], repeat["parent_asin"]))
  assert isinstance(error.value, DataError)
  assert str(error.value) == (
      f"{path}:{line}: user {repeat['user_id']} reviewed item "
      f"{repeat['parent_asin']} again (also at line {first}); set "
      "config.data.duplicates='drop' to keep the earliest")
  # "drop" keeps the earliest review of the pair: its rating, not the repeat's
  data = amazon.read_amazon(AMAZON, "All_Beauty", duplicates="drop")
  earliest = min((json.loads(lines[i - 1]) for i in (line, first)),
                 key=lambda r: r["timestamp"])
  user = int(np.nonzero(data.users.source_ids == repeat["user_id"])[0][0])
  events = slice(data.user_offsets[user], data.user_offsets[user + 1])
  at = data.items.source_ids[data.item_ids[events]].tolist().index(
      repeat["parent_asin"])
  assert data.ratings[events][at] == earliest["rating"]
  assert data.timestamps[events][at] == earliest["timestamp"] // 1000


def test_reviews_in_one_second_keep_their_millisecond_order(tmp_path):
  """Timestamps become seconds; two reviews in the same second, listed out of
  order, stay in the order of their milliseconds."""
  copy_amazon(tmp_path)
  meta = records(tmp_path / "meta_All_Beauty.jsonl")
  a, b, c = (m["parent_asin"] for m in meta[:3])
  review = lambda item, ms: json.dumps({  # noqa: E731
      "rating": 5.0, "title": "", "text": "", "images": [], "asin": item,
      "parent_asin": item, "user_id": "AE", "timestamp": ms,
      "helpful_vote": 0, "verified_purchase": True})
  (tmp_path / "All_Beauty.jsonl").write_text("\n".join(
      [review(a, 1600000000900), review(b, 1600000000100),
       review(c, 1600000001000)]) + "\n")
  data = amazon.read_amazon(str(tmp_path), "All_Beauty")
  assert data.items.source_ids[data.item_ids].tolist() == [b, a, c]
  assert data.timestamps.tolist() == [1600000000, 1600000000, 1600000001]


def test_the_benchmark_split_files_hold_the_same_events():
  """last_out_w_his' train/valid/test (header with `history`), unioned, are
  the deduplicated reviews."""
  reviews = amazon.read_amazon(AMAZON, "All_Beauty", duplicates="drop")
  report = {}
  split = amazon.read_amazon(AMAZON, "All_Beauty", "5core/last_out_w_his",
                             report=report)
  assert report["duplicates_dropped"] == 0 and same_events(reviews, split)
  assert split.items.titles.tolist() == reviews.items.titles.tolist()
  assert split.source.endswith("All_Beauty.{train,valid,test}.csv")


@pytest.mark.parametrize("bad_line,reason", [
    ("{not json", "not JSON: Expecting property name enclosed in double quotes "
     "at column 2"),
    ('["a list"]', "not a JSON object (one review or item per line)"),
    ('{"parent_asin": "B0X", "rating": 5.0, "timestamp": 1}',
     "field 'user_id' (missing) must be a non-empty string id"),
    ('{"user_id": "U", "parent_asin": "B0X", "rating": 6.0, "timestamp": 1}',
     "field 'rating' (6.0) must be a whole number of stars 1..5"),
    ('{"user_id": "U", "parent_asin": "B0X", "rating": "five", "timestamp": 1}',
     "field 'rating' (\"five\") must be a whole number of stars 1..5"),
    ('{"user_id": "U", "parent_asin": "B0X", "rating": 5.0, "timestamp": -3}',
     "field 'timestamp' (-3) must be a non-negative integer"),
    ('{"user_id": "U", "parent_asin": "B0X", "rating": true, "timestamp": 1}',
     "field 'rating' (true) must be a whole number of stars 1..5"),
])
def test_a_malformed_review_line_names_file_and_line(tmp_path, bad_line, reason):
  copy_amazon(tmp_path)
  path = tmp_path / "All_Beauty.jsonl"
  good = path.read_text(encoding="utf-8").splitlines()[:3]
  path.write_text("\n".join(good + ["", bad_line]) + "\n", encoding="utf-8")
  with pytest.raises(movielens.MalformedRowError) as error:
    amazon.read_amazon(str(tmp_path), "All_Beauty")
  assert str(error.value) == f"{path}:5: {reason}"


def test_bytes_that_are_not_utf8_and_a_cut_gzip_name_the_line(tmp_path):
  copy_amazon(tmp_path)
  path = tmp_path / "All_Beauty.jsonl"
  good = path.read_bytes().split(b"\n")[:2]
  path.write_bytes(b"\n".join(good + [b'{"user_id": "caf\xe9"}']) + b"\n")
  with pytest.raises(movielens.MalformedRowError, match=rf"{path}:3: byte 0xe9 "
                     "is not UTF-8"):
    amazon.read_amazon(str(tmp_path), "All_Beauty")
  copy_amazon(tmp_path, compress=True)
  os.remove(path)
  packed = (tmp_path / "All_Beauty.jsonl.gz").read_bytes()
  (tmp_path / "All_Beauty.jsonl.gz").write_bytes(packed[:len(packed) // 2])
  with pytest.raises(movielens.MalformedRowError,
                     match=r"All_Beauty\.jsonl\.gz:\d+: the gzip stream is cut "
                     "short or corrupt .*download the file again"):
    amazon.read_amazon(str(tmp_path), "All_Beauty", duplicates="drop")


def test_the_benchmark_header_and_width_are_checked(tmp_path):
  folder = tmp_path / "benchmark" / "5core" / "last_out"
  folder.mkdir(parents=True)
  copy_amazon(tmp_path)
  header = "user_id,parent_asin,rating,timestamp"
  (folder / "All_Beauty.train.csv").write_text(f"{header}\nU1,B01,5.0,1000\n")
  (folder / "All_Beauty.valid.csv").write_text("user,item,rating,time\n")
  (folder / "All_Beauty.test.csv").write_text(f"{header}\nU1,B02,5.0\n")
  with pytest.raises(movielens.MalformedRowError) as error:
    amazon.read_amazon(str(tmp_path), "All_Beauty", "5core/last_out")
  assert str(error.value) == (
      f"{folder / 'All_Beauty.valid.csv'}:1: expected the header "
      f"{header}[,history], found 'user,item,rating,time'")
  (folder / "All_Beauty.valid.csv").write_text(f"{header}\n")
  with pytest.raises(movielens.MalformedRowError,
                     match=r"All_Beauty\.test\.csv:2: expected 4 fields"):
    amazon.read_amazon(str(tmp_path), "All_Beauty", "5core/last_out")


def test_missing_amazon_files_say_how_to_download_them(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    amazon.read_amazon(str(tmp_path), "All_Beauty")
  assert str(error.value) == (
      f"the All_Beauty review file not found in {tmp_path} (looked for "
      "All_Beauty.jsonl, All_Beauty.jsonl.gz); fetch them with `python -m "
      f"data.download amazon2023:All_Beauty --dir {tmp_path} --accept_terms` "
      "(the release: https://amazon-reviews-2023.github.io/)")
  with pytest.raises(FileNotFoundError, match="--benchmark 5core/timestamp`"):
    amazon.read_amazon(str(tmp_path), "All_Beauty", "5core/timestamp")


def test_the_genre_table_is_the_k_most_frequent_categories():
  data = amazon.read_amazon(AMAZON, "All_Beauty", duplicates="drop",
                            num_categories=3)
  assert data.items.genre_names == ("All Beauty", "Beauty & Personal Care",
                                    "Skin Care")
  counts = data.items.genres[1:].sum(axis=0)
  assert counts.tolist() == sorted(counts.tolist(), reverse=True)


# --- Google Local, Yelp -------------------------------------------------------

def test_google_local_reviews_and_businesses():
  report = {}
  data = google_local.read_google_local(GOOGLE, "Hawaii_10", duplicates="drop",
                                        report=report)
  reviews = records(os.path.join(GOOGLE, "review-Hawaii_10.json"))
  meta = {m["gmap_id"]: m for m in records(os.path.join(GOOGLE, "meta-Hawaii.json"))}
  assert data.name == "google_local_Hawaii_10"
  assert (data.num_users, data.num_events) == (8, len(reviews) - 1)
  # the fixture repeats one review line exactly
  assert report == {"duplicates_dropped": 1, "items_without_title": 0}
  assert data.users.source_ids.tolist() == sorted({r["user_id"] for r in reviews})
  assert all(len(u) == 21 for u in data.users.source_ids)
  title = dict(zip(data.items.source_ids, data.items.titles))
  assert {title[g] for g in title if g} == {meta[g]["name"] for g in title if g}
  assert "Waikīkī Aquarium" in title.values()
  no_category = next(g for g, m in meta.items() if m["category"] is None)
  row = list(data.items.source_ids).index(no_category)
  assert not data.items.genres[row].any()
  assert "Cafe" == data.items.genre_names[0]  # the most frequent
  assert data.timestamps.max() == max(r["time"] for r in reviews) // 1000


def test_google_local_missing_metadata_says_how_to_download(tmp_path):
  shutil.copy(os.path.join(GOOGLE, "review-Hawaii_10.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match=re.escape(
      "the Hawaii business metadata file not found in ")) as error:
    google_local.read_google_local(str(tmp_path), "Hawaii_10")
  assert (f"`python -m data.download google_local:Hawaii_10 --dir {tmp_path} "
          "--accept_terms`") in str(error.value)


def test_yelp_reviews_and_businesses():
  data = yelp.read_yelp(YELP)
  reviews = records(os.path.join(YELP, "yelp_academic_dataset_review.json"))
  businesses = {b["business_id"]: b for b in records(
      os.path.join(YELP, "yelp_academic_dataset_business.json"))}
  assert (data.num_users, data.num_events) == (7, len(reviews))
  assert set(data.ratings.tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
  row = list(data.items.source_ids).index(reviews[0]["business_id"])
  business = businesses[reviews[0]["business_id"]]
  assert data.items.titles[row] == business["name"]
  categories = [c.strip() for c in business["categories"].split(",")]
  assert {data.items.genre_names[j] for j in np.nonzero(data.items.genres[row])[0]
          } == set(categories) & set(data.items.genre_names)
  assert data.items.genre_names[0] == "Restaurants"
  # "2015-11-02 09:25:23" read as UTC
  first = sorted(r["date"] for r in reviews)[0]
  moment = datetime.datetime.strptime(first, "%Y-%m-%d %H:%M:%S")
  assert data.timestamps.min() == int(moment.replace(
      tzinfo=datetime.timezone.utc).timestamp())
  mystery = next(b for b, v in businesses.items() if v["categories"] is None)
  assert not data.items.genres[list(data.items.source_ids).index(mystery)].any()


def test_a_yelp_date_in_another_format_names_the_line(tmp_path):
  shutil.copy(os.path.join(YELP, "yelp_academic_dataset_business.json"), tmp_path)
  review = records(os.path.join(YELP, "yelp_academic_dataset_review.json"))[0]
  path = tmp_path / "yelp_academic_dataset_review.json"
  path.write_text(json.dumps(dict(review, date="2018-07-07T22:09:11Z")) + "\n")
  with pytest.raises(movielens.MalformedRowError) as error:
    yelp.read_yelp(str(tmp_path))
  assert str(error.value) == (f"{path}:1: field 'date' ('2018-07-07T22:09:11Z') "
                              "is not a date 'YYYY-MM-DD HH:MM:SS'")


# --- SASRec-style sequence files -----------------------------------------------

def test_a_sequence_file_keeps_its_order_and_ids():
  data = sequence_files.read_sequence_file(SEQUENCES, "Beauty.txt")
  with open(os.path.join(SEQUENCES, "Beauty.txt")) as f:
    pairs = [tuple(map(int, line.split())) for line in f]
  assert data.name == "sequence_file_Beauty"
  assert (data.num_users, data.num_events) == (24, len(pairs))
  assert data.users.raw_ids.tolist() == list(range(1, 25))
  assert data.items.source_ids is None and data.users.source_ids is None
  for user in (0, 5):
    events = slice(data.user_offsets[user], data.user_offsets[user + 1])
    assert data.items.raw_ids[data.item_ids[events]].tolist() == [
        i for u, i in pairs if u == user + 1]
    assert data.timestamps[events].tolist() == list(range(events.stop
                                                          - events.start))
  assert not data.ratings.any()  # implicit feedback: no ratings
  assert not any(data.items.titles) and data.items.genres.shape == (
      data.num_items + 1, 0)


def test_an_item_map_gives_titles_and_categories():
  report = {}
  data = sequence_files.read_sequence_file(SEQUENCES, "Beauty.txt",
                                           "Beauty_items.tsv", report=report)
  assert report["items_without_title"] == 1  # item 15 is not in the map
  by_id = dict(zip(data.items.raw_ids.tolist(), data.items.titles))
  assert by_id[4] == "Crème Hand Cream" and by_id[15] == "15"
  assert data.items.genre_names[:2] == ("Skin Care", "Hair Care")


@pytest.mark.parametrize("bad_line,reason", [
    ("3", "expected '<user id> <item id>', found 1 fields"),
    ("3 x7", "item id 'x7' is not an integer >= 1"),
    ("0 5", "user id '0' is not an integer >= 1"),
])
def test_a_malformed_sequence_line_names_file_and_line(tmp_path, bad_line, reason):
  path = tmp_path / "ml-1m.txt"
  path.write_text(f"1 1\n1 2\n\n{bad_line}\n")
  with pytest.raises(movielens.MalformedRowError) as error:
    sequence_files.read_sequence_file(str(tmp_path), "ml-1m.txt")
  assert str(error.value) == f"{path}:4: {reason}"
  path.write_text("1 1\n1 2\n1 1\n")
  with pytest.raises(movielens.MalformedRowError, match=r"ml-1m\.txt:3: user 1 "
                     r"reviewed item 1 again \(also at line 1\)"):
    sequence_files.read_sequence_file(str(tmp_path), "ml-1m.txt")


def test_text_workflows_on_a_sequence_file_without_titles_are_a_config_error():
  data = sequence_files.read_sequence_file(SEQUENCES, "Beauty.txt")
  with pytest.raises(ConfigError) as error:
    sources.require_item_text(data, "user_llm")
  assert str(error.value) == (
      f"config.data.source: {os.path.join(SEQUENCES, 'Beauty.txt')} has no item "
      "titles, no ratings, no two or more categories (it has 0), which workflow "
      "'user_llm' puts into its prompts; give a sequence file an item map with "
      "titles and categories (config.data.item_map, docs/data.md) or run "
      "workflow next_item or federated")
  sources.require_item_text(amazon.read_amazon(AMAZON, "All_Beauty",
                                               duplicates="drop"), "user_llm")


# --- config.data dispatch -----------------------------------------------------

def data_section(**fields):
  return ml_collections.ConfigDict(dict(duplicates="drop", num_categories=20,
                                        max_len=16, **fields))


@pytest.mark.parametrize("fields,name", [
    (dict(source="amazon2023", dir=AMAZON, category="All_Beauty",
          events="reviews"), "amazon2023_All_Beauty"),
    (dict(source="google_local", dir=GOOGLE, region="Hawaii_10"),
     "google_local_Hawaii_10"),
    (dict(source="yelp", dir=YELP), "yelp"),
    (dict(source="sequence_file", dir=SEQUENCES, file="Beauty.txt",
          item_map="Beauty_items.tsv"), "sequence_file_Beauty"),
])
def test_config_data_source_picks_the_reader(fields, name, capsys):
  assert sources.load_timelines(data_section(**fields)).name == name
  assert capsys.readouterr().out.startswith(f"[data] {name}: ")


def test_config_data_errors_are_one_line_and_name_the_field(tmp_path):
  with pytest.raises(ConfigError, match=r"config.data.source='amazon' is not one "
                     r"of \('synthetic', 'movielens', 'amazon2023', "):
    sources.load_timelines(data_section(source="amazon", dir=AMAZON))
  with pytest.raises(ConfigError, match="config.data.category must be set"):
    sources.load_timelines(data_section(source="amazon2023", dir=AMAZON,
                                        category="", events="reviews"))
  with pytest.raises(ConfigError, match="config.data.num_categories=0 must be"):
    sources.load_timelines(ml_collections.ConfigDict(dict(
        source="yelp", dir=YELP, duplicates="drop", num_categories=0)))
  with pytest.raises(ConfigError, match=r"config.data.events='6core/x' is not"):
    sources.load_timelines(data_section(source="amazon2023", dir=AMAZON,
                                        category="All_Beauty", events="6core/x"))
  with pytest.raises(FileNotFoundError) as error:
    sources.load_timelines(data_section(source="amazon2023",
                                        dir=str(tmp_path / "amazon2023"),
                                        category="All_Beauty", events="reviews"))
  assert "\n" not in str(error.value)
  assert (f"`python -m data.download amazon2023:All_Beauty --dir "
          f"{tmp_path / 'amazon2023'} --accept_terms`") in str(error.value)


def test_the_movielens_1m_config_says_how_to_download_its_folder():
  from configs import movielens_1m
  with pytest.raises(FileNotFoundError) as error:
    sources.load_timelines(movielens_1m.get_config().data, quiet=True)
  assert str(error.value).startswith(
      "config.data.dir='../shared/data/ml-1m' is not a directory: ")
  assert ("or fetch it with `python -m data.download movielens-1m --dir "
          "../shared/data --accept_terms`") in str(error.value)


@pytest.mark.parametrize("name", ["movielens_1m", "amazon_beauty"])
def test_the_configs_tiny_variants_read_their_fixtures(name):
  import importlib
  module = importlib.import_module(f"configs.{name}")
  full, tiny = module.get_config(), module.get_config("tiny")
  assert sorted(full.to_dict()) == sorted(tiny.to_dict())
  for section in full.keys():
    if hasattr(full[section], "keys"):
      assert sorted(full[section].keys()) == sorted(tiny[section].keys())
  cwd = os.getcwd()
  os.chdir(REPO)  # the configs' folders are relative to the repository
  try:
    assert sources.load_timelines(tiny.data, quiet=True).num_events > 100
  finally:
    os.chdir(cwd)


def test_a_tiny_next_item_run_on_the_amazon_fixture(tmp_path, tiny_config):
  """configs/default.py:tiny with its data section pointed at the Amazon
  fixture (configs/amazon_beauty.py:tiny's) trains and evaluates; every
  field of that section is read."""
  from configs import amazon_beauty
  tiny_config.data = amazon_beauty.get_config("tiny").data
  tiny_config.data.dir = AMAZON
  with ConfigReads() as reads:
    results = run_workflow(tiny_config, tmp_path)
  assert reads.unread(tiny_config) == []
  assert results["num_users"] == 24 and results["num_items"] == 25
  for split in ("valid", "test"):
    assert 0 <= results[f"{split}/model/next_item/recall@10"] <= 1


def test_the_movielens_1m_tiny_config_runs_and_reads_every_field(tmp_path):
  from configs import movielens_1m
  config = movielens_1m.get_config("tiny")
  config.data.dir = os.path.join(REPO, movielens_1m.TINY_DIR)
  with ConfigReads() as reads:
    results = run_workflow(config, tmp_path)
  assert reads.unread(config) == []
  assert results["num_users"] == 14 and results["steps"] == 6


def test_a_malformed_line_is_error_exit_2_from_main(tmp_path):
  copy_amazon(tmp_path)
  path = tmp_path / "All_Beauty.jsonl"
  path.write_text(path.read_text(encoding="utf-8") + "{oops\n", encoding="utf-8")
  result = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/amazon_beauty.py:tiny",
       f"--config.data.dir={tmp_path}", "--workdir", str(tmp_path / "run")],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  lines = open(path, encoding="utf-8").read().count("\n")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {path}:{lines}: not JSON: Expecting property name enclosed in "
      "double quotes at column 2")


# --- python -m data.download ---------------------------------------------------

class FileServer(http.server.ThreadingHTTPServer):
  """Serves `files` ({path: bytes}) on 127.0.0.1, honouring `Range: bytes=a-`
  when `ranges`; `cut` ({path: n}) sends only n bytes of a path's next answer
  (then closes, as a dropped connection); `requests` logs (path, Range)."""

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.files, self.cut, self.requests, self.ranges = {}, {}, [], True

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(http.server.BaseHTTPRequestHandler):

  def do_GET(self):  # noqa: N802 (http.server's name)
    path, wanted = self.path.lstrip("/"), self.headers.get("Range")
    self.server.requests.append((path, wanted))
    body = self.server.files.get(path)
    if body is None:
      self.send_error(404)
      return
    start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)) if (
        wanted and self.server.ranges) else 0
    if start >= len(body) and start:
      self.send_response(416)
      self.send_header("Content-Range", f"bytes */{len(body)}")
      self.end_headers()
      return
    self.send_response(206 if start else 200)
    if start:
      self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    self.send_header("Content-Length", str(len(body) - start))
    self.end_headers()
    payload = body[start:]
    if path in self.server.cut:
      payload = payload[:self.server.cut.pop(path)]
    self.wfile.write(payload)

  def log_message(self, *args):
    pass


@pytest.fixture
def server(monkeypatch):
  for name in ("no_proxy", "NO_PROXY"):  # a proxy in the environment is not
    monkeypatch.setenv(name, "127.0.0.1")  # asked for the local server
  httpd = FileServer()
  thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()


def fetch(server, *args):
  return download.main(list(args) + ["--base_url", server.url])


def zip_of(files: dict) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for name, text in files.items():
      archive.writestr(name, text)
  return buffer.getvalue()


LATEST_SMALL = {
    "ml-latest-small/movies.csv": "movieId,title,genres\n1,Toy Story (1995),"
                                  "Animation|Comedy\n2,Heat (1995),Action\n",
    "ml-latest-small/ratings.csv": "userId,movieId,rating,timestamp\n1,1,4.0,10\n"
                                   "1,2,3.5,20\n2,1,5.0,30\n2,2,1.0,40\n",
}


def test_nothing_is_fetched_before_the_terms_are_accepted(server, tmp_path, capsys):
  assert fetch(server, "movielens-1m", "--dir", str(tmp_path)) == 2
  out, err = capsys.readouterr()
  assert "MovieLens (ml-1m), GroupLens Research" in out and "Harper" in out
  assert err == ("error: pass --accept_terms to accept the terms above and "
                 "download\n")
  assert server.requests == [] and os.listdir(tmp_path) == []


def test_a_movielens_zip_is_checked_against_the_published_md5_and_unpacked(
    server, tmp_path, capsys):
  archive = zip_of(LATEST_SMALL)
  md5 = hashlib.md5(archive).hexdigest()
  server.files = {"ml-latest-small.zip": archive,
                  "ml-latest-small.zip.md5": f"MD5 (ml-latest-small.zip) = {md5}\n"
                                             .encode()}
  assert fetch(server, "movielens-latest-small", "--dir", str(tmp_path),
               "--accept_terms") == 0
  out = capsys.readouterr().out
  assert f"MD5 {md5} (published)" in out
  assert sorted(os.listdir(tmp_path)) == ["ml-latest-small", "ml-latest-small.zip"]
  data = movielens.read_movielens(str(tmp_path / "ml-latest-small"))
  assert (data.num_users, data.num_items, data.num_events) == (2, 2, 4)
  assert f"done: point config.data.dir at {tmp_path / 'ml-latest-small'}" in out
  # again: the zip there is checked, not fetched
  server.requests.clear()
  assert fetch(server, "movielens-latest-small", "--dir", str(tmp_path),
               "--accept_terms") == 0
  assert [p for p, _ in server.requests] == ["ml-latest-small.zip.md5"]


def test_a_checksum_mismatch_is_a_one_line_error_and_keeps_nothing(
    server, tmp_path, capsys):
  archive = zip_of(LATEST_SMALL)  # not GroupLens' ml-100k.zip
  server.files = {"ml-100k.zip": archive}
  assert fetch(server, "movielens-100k", "--dir", str(tmp_path),
               "--accept_terms") == 2
  err = capsys.readouterr().err
  assert err == (f"error: checksum mismatch for {server.url}ml-100k.zip: MD5 "
                 f"{hashlib.md5(archive).hexdigest()}, published "
                 "0e33842e24a9c977be4e0107933c0723; the download was removed: "
                 "run the command again (if it repeats, the server's file "
                 "changed: tell us)\n")
  assert os.listdir(tmp_path) == []


def amazon_files():
  """The Amazon fixture gzipped, at the release's paths on the server."""
  out = {}
  for name, remote in (("All_Beauty.jsonl", "raw/review_categories/"),
                       ("meta_All_Beauty.jsonl", "raw/meta_categories/")):
    with open(os.path.join(AMAZON, name), "rb") as f:
      out[remote + name + ".gz"] = gzip.compress(f.read(), mtime=0)
  return out


def test_an_amazon_category_downloads_as_gzip_and_reads(server, tmp_path, capsys):
  server.files = amazon_files()
  folder = tmp_path / "amazon2023"
  assert fetch(server, "amazon2023:All_Beauty", "--dir", str(folder),
               "--accept_terms") == 0
  out = capsys.readouterr().out
  assert "Amazon Reviews 2023 (All_Beauty), McAuley Lab" in out
  assert out.count("gzip stream whole; SHA-256 ") == 2
  assert sorted(os.listdir(folder)) == ["All_Beauty.jsonl.gz",
                                        "meta_All_Beauty.jsonl.gz"]
  got = amazon.read_amazon(str(folder), "All_Beauty", duplicates="drop")
  assert same_events(got, amazon.read_amazon(AMAZON, "All_Beauty",
                                             duplicates="drop"))


def test_an_interrupted_download_resumes_with_a_range_request(
    server, tmp_path, capsys):
  server.files = amazon_files()
  reviews = "raw/review_categories/All_Beauty.jsonl.gz"
  server.cut[reviews] = 1000
  assert fetch(server, "amazon2023:All_Beauty", "--dir", str(tmp_path),
               "--accept_terms") == 2
  err = capsys.readouterr().err
  assert err == (f"error: {server.url}{reviews}: the transfer stopped after "
                 f"1,000 of {len(server.files[reviews]):,} bytes; run the "
                 "command again to resume\n")
  assert os.path.getsize(tmp_path / "All_Beauty.jsonl.gz.part") == 1000
  assert not os.path.exists(tmp_path / "All_Beauty.jsonl.gz")
  server.requests.clear()
  assert fetch(server, "amazon2023:All_Beauty", "--dir", str(tmp_path),
               "--accept_terms") == 0
  assert (reviews, "bytes=1000-") in server.requests
  assert "resuming All_Beauty.jsonl.gz at byte 1,000" in capsys.readouterr().out
  with open(tmp_path / "All_Beauty.jsonl.gz", "rb") as f:
    assert f.read() == server.files[reviews]
  assert not any(name.endswith(".part") for name in os.listdir(tmp_path))


def test_a_server_that_ignores_the_range_sends_the_whole_file_again(
    server, tmp_path, capsys):
  server.files, server.ranges = amazon_files(), False
  (tmp_path / "All_Beauty.jsonl.gz.part").write_bytes(b"stale bytes")
  assert fetch(server, "amazon2023:All_Beauty", "--dir", str(tmp_path),
               "--accept_terms") == 0
  assert "the server sent the whole file" in capsys.readouterr().out
  with open(tmp_path / "All_Beauty.jsonl.gz", "rb") as f:
    assert f.read() == server.files["raw/review_categories/All_Beauty.jsonl.gz"]


def test_a_damaged_gzip_and_a_missing_file_are_one_line_errors(
    server, tmp_path, capsys):
  server.files = amazon_files()
  reviews = "raw/review_categories/All_Beauty.jsonl.gz"
  server.files[reviews] = server.files[reviews][:-20]  # cut short at the source
  assert fetch(server, "amazon2023:All_Beauty", "--dir", str(tmp_path),
               "--accept_terms") == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {server.url}{reviews}: the file is not a whole "
                        "gzip stream (") and err.count("\n") == 1
  assert os.listdir(tmp_path) == []
  del server.files[reviews]
  assert fetch(server, "amazon2023:All_Beauty", "--dir", str(tmp_path),
               "--accept_terms") == 2
  assert capsys.readouterr().err == (f"error: {server.url}{reviews}: HTTP 404 "
                                     "Not Found\n")


def test_unknown_names_list_the_choices(capsys, tmp_path):
  assert download.main(["amazon2023:Beauty", "--dir", str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith(
      "error: amazon2023:Beauty is not a category of the release; the categories "
      "are All_Beauty, Amazon_Fashion, ")
  assert download.main(["imdb", "--dir", str(tmp_path)]) == 2
  assert capsys.readouterr().err == (
      "error: unknown data set 'imdb'; the names are movielens-100k, "
      "movielens-1m, movielens-latest-small, movielens-latest, "
      "amazon2023:<Category>, google_local:<Region>\n")
  assert download.main(["amazon2023:All_Beauty", "--dir", str(tmp_path),
                        "--benchmark", "5core/last"]) == 2
  assert "--benchmark='5core/last' is not one of 5core/rating_only" in (
      capsys.readouterr().err)


def test_the_benchmark_files_land_where_the_reader_looks(server, tmp_path):
  server.files = amazon_files()
  folder = os.path.join(AMAZON, "benchmark", "5core", "last_out_w_his")
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      server.files[f"benchmark/5core/last_out_w_his/{name}.gz"] = gzip.compress(
          f.read())
  assert fetch(server, "amazon2023:All_Beauty", "--dir", str(tmp_path),
               "--benchmark", "5core/last_out_w_his", "--accept_terms") == 0
  got = amazon.read_amazon(str(tmp_path), "All_Beauty", "5core/last_out_w_his")
  assert got.num_events == 157


def test_the_text_workflows_refuse_a_sequence_file_without_titles(tmp_path):
  """The check runs in the User-LLM workflow itself, before any training."""
  from conftest import run_workflow
  from configs import user_llm
  config = user_llm.get_config("tiny")
  config.data.update(source="sequence_file", dir=SEQUENCES, file="Beauty.txt",
                     item_map="", num_categories=20, duplicates="drop")
  with pytest.raises(ConfigError, match="workflow 'user_llm' puts into its prompts"):
    run_workflow(config, tmp_path)
  assert not (tmp_path / "lm").exists()
