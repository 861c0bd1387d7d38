"""MovieLens readers: all three formats on fixture files, bad rows, the real 100K."""

import os

import numpy as np
import pytest

from conftest import ML100K_DIR
from data import movielens

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


def test_unknown_item_in_ratings_is_an_error(ml100k_dir):
  write(ml100k_dir / "u.data", ["1\t99\t5\t100"], "latin-1")
  with pytest.raises(ValueError, match="item id 99"):
    movielens.read_movielens(str(ml100k_dir))


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
