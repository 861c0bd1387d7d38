"""MovieLens readers: all three formats on fixture files, bad rows, the real 100K."""

import os

import numpy as np
import pytest

from conftest import ML100K_DIR
from data import movielens
from infra.errors import DataError

GENRES_100K = ["unknown", "Action", "Comedy"]


def write(path, lines, encoding="utf-8"):
  with open(path, "w", encoding=encoding) as f:
    f.write("\n".join(lines) + "\n")


@pytest.fixture
def ml100k_dir(tmp_path):
  write(tmp_path / "u.genre", [f"{g}|{i}" for i, g in enumerate(GENRES_100K)] + [""],
        "latin-1")
  write(tmp_path / "u.item", [
      "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1",
      "2|Café Society (1995)|01-Jan-1995||http://x|0|1|1",
      "7|unknown||||1|0|0"], "latin-1")
  write(tmp_path / "u.user", ["1|24|M|technician|85711", "5|33|F|other|15213"],
        "latin-1")
  write(tmp_path / "u.data", ["5\t1\t4\t300", "1\t2\t3\t200", "1\t1\t5\t100",
                              "1\t7\t2\t150"], "latin-1")
  return tmp_path


def test_100k_fixture(ml100k_dir):
  data = movielens.read_movielens(str(ml100k_dir))
  assert data.name == "movielens_100k"
  assert (data.num_users, data.num_items, data.num_events) == (2, 3, 4)
  assert data.items.titles[2] == "Café Society" and data.items.years[2] == 1995
  assert data.items.titles[3] == "unknown" and data.items.years[3] == 0
  assert data.items.genre_names == tuple(GENRES_100K)
  assert data.items.genres[2].tolist() == [False, True, True]
  # User 1 (raw) events sorted by time: items raw 1 (t=100), 7 (150), 2 (200).
  assert data.items.raw_ids[data.user_items(0)].tolist() == [1, 7, 2]
  assert data.ratings[:3].tolist() == [5.0, 2.0, 3.0]
  assert data.users.ages.tolist() == [24, 33]
  assert data.users.occupations.tolist() == ["technician", "other"]


def test_100k_malformed_row_names_file_and_line(ml100k_dir):
  write(ml100k_dir / "u.data", ["1\t1\t5\t100", "1\t2\tfive\t200"], "latin-1")
  with pytest.raises(movielens.MalformedRowError, match=r"u\.data:2: rating"):
    movielens.read_movielens(str(ml100k_dir))
  write(ml100k_dir / "u.data", ["1\t1\t5\t100", "1\t2\t3"], "latin-1")
  with pytest.raises(movielens.MalformedRowError, match=r"u\.data:2: expected 4"):
    movielens.read_movielens(str(ml100k_dir))


GOOD_ROW = "1\t1\t5\t100"


@pytest.mark.parametrize("bad_row,reason", [
    ("1\t2\tnan\t200", "rating is not finite: 'nan'"),
    ("1\t2\tinf\t200", "rating is not finite: 'inf'"),
    ("1\t2\t6\t200", "rating '6' is not one of 1..5 in steps of 1"),
    ("1\t2\t3.5\t200", "rating '3.5' is not one of 1..5"),
    ("1.5\t2\t3\t200", "user id is not an integer: '1.5'"),
    ("1\t2.9\t3\t200", "item id is not an integer: '2.9'"),
    ("1\t2\t3\tnan", "timestamp is not an integer: 'nan'"),
    ("1\t2\t3\t-5", "timestamp -5 is negative"),
    ("1\t99\t5\t100", "item id 99 is not in the items file"),
    ("8\t2\t5\t100", "user id 8 is not in the users file"),
    ("1\t1\t4\t300", "user 1 rated item 1 again"),
])
def test_bad_values_name_file_and_line(ml100k_dir, bad_row, reason):
  write(ml100k_dir / "u.data", [GOOD_ROW, bad_row], "latin-1")
  with pytest.raises(movielens.MalformedRowError) as error:
    movielens.read_movielens(str(ml100k_dir))
  assert str(error.value).startswith(f"{ml100k_dir / 'u.data'}:2: {reason}")


def test_duplicates_can_be_dropped_and_are_counted(ml100k_dir):
  write(ml100k_dir / "u.data", [GOOD_ROW, "1\t2\t3\t200", GOOD_ROW, GOOD_ROW],
        "latin-1")
  report = {}
  data = movielens.read_movielens(str(ml100k_dir), duplicates="drop", report=report)
  assert data.num_events == 2 and report["duplicates_dropped"] == 2


def test_empty_or_misencoded_files_name_the_file(ml100k_dir):
  (ml100k_dir / "u.data").write_text("")
  with pytest.raises(movielens.MalformedRowError, match=r"u\.data:1: no ratings"):
    movielens.read_movielens(str(ml100k_dir))
  (ml100k_dir / "u.data").write_bytes(f"{GOOD_ROW}\n".encode("utf-16"))
  with pytest.raises(movielens.MalformedRowError,
                     match=r"u\.data:1: the file is UTF-16; .* latin-1"):
    movielens.read_movielens(str(ml100k_dir))


def test_a_latest_file_not_in_utf8_names_the_line(latest_dir):
  ratings = (latest_dir / "ratings.csv").read_bytes()
  (latest_dir / "ratings.csv").write_bytes(ratings + b"1,1,4.0,9\xe9\n")
  line = ratings.count(b"\n") + 1
  with pytest.raises(movielens.MalformedRowError,
                     match=rf"ratings\.csv:{line}: byte 0xe9 is not utf-8"):
    movielens.read_movielens(str(latest_dir))


@pytest.fixture
def ml1m_dir(tmp_path):
  write(tmp_path / "movies.dat", ["1::Toy Story (1995)::Animation|Children's|Comedy",
                                  "2::Jumanji (1995)::Adventure"], "latin-1")
  write(tmp_path / "users.dat", ["1::F::1::10::48067", "2::M::56::16::70072"],
        "latin-1")
  write(tmp_path / "ratings.dat", ["1::2::3::978300760", "1::1::5::978300000",
                                   "2::1::4::978299000"], "latin-1")
  return tmp_path


def test_1m_fixture(ml1m_dir):
  data = movielens.read_movielens(str(ml1m_dir))
  assert data.name == "movielens_1m"
  assert (data.num_users, data.num_items, data.num_events) == (2, 2, 3)
  assert data.items.raw_ids[data.user_items(0)].tolist() == [1, 2]
  names = data.items.genre_names
  assert {names[i] for i in np.nonzero(data.items.genres[1])[0]} == {
      "Animation", "Children's", "Comedy"}
  assert data.users.occupations.tolist() == ["K-12 student", "self-employed"]
  assert data.users.genders.tolist() == ["F", "M"]


def test_1m_malformed_row(ml1m_dir):
  write(ml1m_dir / "movies.dat", ["1::Toy Story (1995)::Animation",
                                  "2::Jumanji (1995)::Space Opera"], "latin-1")
  with pytest.raises(movielens.MalformedRowError,
                     match=r"movies\.dat:2: unknown genre 'Space Opera'"):
    movielens.read_movielens(str(ml1m_dir))


@pytest.fixture
def latest_dir(tmp_path):
  write(tmp_path / "movies.csv", [
      "movieId,title,genres",
      '10,"American President, The (1995)",Comedy|Drama|Romance',
      "20,Heat (1995),Action|Crime|Thriller",
      "30,Untitled Project,(no genres listed)"])
  write(tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp",
                                   "3,20,4.5,200", "3,10,3.0,100", "8,30,0.5,50"])
  write(tmp_path / "tags.csv", ["userId,movieId,tag,timestamp",
                                "3,20,heist,1", "8,20,heist,2", "8,20,LA,3"])
  return tmp_path


def test_latest_fixture(latest_dir):
  data = movielens.read_movielens(str(latest_dir))
  assert data.name == "movielens_latest"
  assert data.items.titles[1] == "American President, The"
  assert data.items.years[1] == 1995 and data.items.years[3] == 0
  assert not data.items.genres[3].any()
  assert data.items.raw_ids[data.user_items(0)].tolist() == [10, 20]
  assert data.ratings[data.user_offsets[1]] == pytest.approx(0.5)
  assert data.items.tags[2] == ("heist", "LA") and data.items.tags[1] == ()
  assert (data.users.ages == -1).all()  # the latest format has no demographics


def test_latest_malformed_row(latest_dir):
  write(latest_dir / "ratings.csv", ["userId,movieId,rating,timestamp",
                                     "3,20,4.5,200", "3,10,3.0"])
  with pytest.raises(movielens.MalformedRowError, match=r"ratings\.csv:3:"):
    movielens.read_movielens(str(latest_dir))


def test_missing_directory_and_unknown_format(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    movielens.read_movielens(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no MovieLens ratings file"):
    movielens.read_movielens(str(tmp_path))


def test_real_movielens_100k():
  assert os.path.isdir(ML100K_DIR), f"expected the real data at {ML100K_DIR}"
  data = movielens.read_movielens(ML100K_DIR)
  assert (data.num_users, data.num_items, data.num_events) == (943, 1682, 100000)
  assert data.lengths.min() >= 20
  assert data.items.titles[1] == "Toy Story" and data.items.years[1] == 1995
  assert len(data.items.genre_names) == 19
  assert set(np.unique(data.ratings)) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_a_synthetic_config_switched_to_movielens_reads_the_files(ml100k_dir):
  """`--config.data.source=movielens` on a synthetic config (the README's
  federated MovieLens command) has no `duplicates` field: the default holds."""
  from configs import fedavg
  from data import sources
  data = fedavg.get_config("tiny").data
  data.update(source="movielens", dir=str(ml100k_dir))
  assert "duplicates" not in data
  assert sources.load_timelines(data, quiet=True).num_events > 0


# --- data conditions that used to be tracebacks or silent (issue 40) ----------

def _movielens_config(data_dir):
  from configs import movielens_100k
  data = movielens_100k.get_config("tiny").data
  data.dir = str(data_dir)
  return data


def test_every_user_with_a_single_rating_is_an_error_naming_the_file(ml100k_dir):
  from data import sources
  write(ml100k_dir / "u.data", ["5\t1\t4\t300", "1\t2\t3\t200"], "latin-1")
  with pytest.raises(DataError) as error:
    sources.load_timelines(_movielens_config(ml100k_dir), quiet=True)
  assert str(error.value) == (
      f"{ml100k_dir / 'u.data'}: no user has 2 or more events (2 users, one event "
      "each), so there is no next event to train on or predict; every workflow "
      "needs users with several (a leave-last-out target needs 3)")


def test_no_user_with_a_held_out_target_is_an_error_naming_the_file(ml100k_dir):
  from data import splits
  write(ml100k_dir / "u.data", ["5\t1\t4\t300", "1\t2\t3\t200", "1\t1\t5\t100"],
        "latin-1")
  data = movielens.read_movielens(str(ml100k_dir))
  with pytest.raises(DataError) as error:
    splits.leave_last_out(data)
  assert str(error.value).startswith(
      f"{ml100k_dir / 'u.data'}: no user has 3 or more events, so none has a "
      "held-out target")
  assert str(error.value).endswith("; users with 1 event: 1, with 2: 1")


@pytest.mark.parametrize("name,reason", [
    ("u.genre", "no genres in the file"), ("u.item", "no movies in the file"),
    ("u.user", "no users in the file")])
def test_an_empty_100k_file_is_an_error_naming_it(ml100k_dir, name, reason):
  (ml100k_dir / name).write_text("")
  with pytest.raises(movielens.MalformedRowError) as error:
    movielens.read_movielens(str(ml100k_dir))
  assert str(error.value).startswith(f"{ml100k_dir / name}:1: {reason}")


@pytest.mark.parametrize("name,reason", [
    ("movies.dat", "no movies in the file"), ("users.dat", "no users in the file")])
def test_an_empty_1m_file_is_an_error_naming_it(ml1m_dir, name, reason):
  (ml1m_dir / name).write_text("")
  with pytest.raises(movielens.MalformedRowError) as error:
    movielens.read_movielens(str(ml1m_dir))
  assert str(error.value) == f"{ml1m_dir / name}:1: {reason}"


def test_the_data_line_counts_users_with_events_and_without_targets(
    ml100k_dir, capsys):
  """Users of u.user who rated nothing are left out and counted; users too
  short for a held-out target are counted (at 23798f5 the line said 943 users
  of the real u.user when 62 had ratings, and nothing of the targets)."""
  from data import sources
  write(ml100k_dir / "u.user", ["1|24|M|technician|85711", "5|33|F|other|15213",
                                "6|42|M|writer|10001", "9|19|F|student|02139"],
        "latin-1")
  data = sources.load_timelines(_movielens_config(ml100k_dir))
  assert data.num_users == 2 and data.users.raw_ids.tolist() == [1, 5]
  assert data.users.occupations.tolist() == ["technician", "other"]
  assert capsys.readouterr().out == (
      "[data] movielens_100k: 2 users, 3 items, 4 events; 2 users of the users "
      "file without ratings left out; 1 user with fewer than 3 events (no "
      "leave-last-out target; kept for training)\n")


def test_missing_data_says_where_movielens_comes_from(tmp_path):
  from data import sources
  with pytest.raises(FileNotFoundError) as error:
    sources.load_timelines(_movielens_config(tmp_path / "nope"), quiet=True)
  with pytest.raises(FileNotFoundError) as no_ratings:
    movielens.read_movielens(str(tmp_path))
  (tmp_path / "u.data").write_text("1\t1\t5\t100\n")
  with pytest.raises(FileNotFoundError) as no_genres:
    movielens.read_movielens(str(tmp_path))
  for message in (str(e.value) for e in (error, no_ratings, no_genres)):
    assert "\n" not in message
    assert "https://grouplens.org/datasets/movielens/" in message, message
    assert ("100K: u.data, u.item, u.user, u.genre; 1M: ratings.dat, movies.dat, "
            "users.dat; latest(-small): ratings.csv, movies.csv") in message
  assert str(no_genres.value).startswith(
      f"MovieLens file not found: {tmp_path / 'u.genre'}")
