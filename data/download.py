"""`python -m data.download <name> --dir <folder> --accept_terms`: fetches a
public data set for a user with the internet (docs/data.md).

Names (`--list` prints them):
- `movielens-100k`, `movielens-1m`, `movielens-latest-small`,
  `movielens-latest`: GroupLens' zip from https://files.grouplens.org/
  datasets/movielens/, checked against the MD5 GroupLens publishes (the
  `<zip>.md5` file beside each zip: pinned here for the frozen 100K and 1M
  releases, read from that file for the `latest` ones, which GroupLens
  updates), then unpacked to `<dir>/ml-100k/` etc. (the zip's folder).
- `amazon2023:<Category>` (e.g. `amazon2023:All_Beauty`; data/amazon.py
  CATEGORIES): the category's reviews and item metadata from
  https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/
  (`review_categories/<Category>.jsonl.gz`,
  `meta_categories/meta_<Category>.jsonl.gz`) into `<dir>/`, kept
  compressed (the readers read gzip); `--benchmark 5core/last_out_w_his`
  (data/amazon.py EVENTS) adds that benchmark variant's CSVs under
  `<dir>/benchmark/5core/last_out_w_his/`. The lab publishes no checksums:
  each file's gzip stream is read through (gzip's CRC catches a damaged or
  cut-short file) and its SHA-256 printed for your records.
- `google_local:<Region>` (e.g. `google_local:Hawaii`, or `Hawaii_10` for
  the 10-core subset): the 2021 release's `review-<Region>.json.gz` and
  `meta-<State>.json.gz` from https://datarepo.eng.ucsd.edu/mcauley_group/
  gdrive/googlelocal/ into `<dir>/`, checked the same way.
Yelp is not here: Yelp hands its data out after a form and agreement at
https://www.yelp.com/dataset.

How: the data set's terms are printed first, and nothing is fetched without
`--accept_terms`. Each file downloads to `<file>.part`; a run that stops
(network, Ctrl-C) leaves it, and the next run asks the server for the rest
(an HTTP Range request) instead of starting over (a server that ignores the
range sends the whole file, which then replaces the part). Only a complete,
checked file is renamed to its name, and a zip is unpacked into a temporary
folder renamed into place, so a file or folder of the final name is always
whole; a file already there is checked and kept. A checksum mismatch
removes the `.part` (resuming it would keep it wrong) and is a one-line
error; every error is one line, `error: ...`, exit code 2. `--base_url`
replaces the data set's server (a mirror; the tests' local server).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib

MOVIELENS_BASE = "https://files.grouplens.org/datasets/movielens/"
AMAZON_BASE = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/"
GOOGLE_LOCAL_BASE = ("https://datarepo.eng.ucsd.edu/mcauley_group/gdrive/"
                     "googlelocal/")
# name -> (the zip's name and folder, its published MD5: "" = read <zip>.md5)
MOVIELENS = {
    "movielens-100k": ("ml-100k", "0e33842e24a9c977be4e0107933c0723"),
    "movielens-1m": ("ml-1m", "c4d9eecfca2ab87c1945afe126590906"),
    "movielens-latest-small": ("ml-latest-small", ""),
    "movielens-latest": ("ml-latest", ""),
}
FAMILIES = ("amazon2023:<Category>", "google_local:<Region>")
CHUNK = 1 << 20
TIMEOUT_S = 60

MOVIELENS_TERMS = """\
MovieLens ({release}), GroupLens Research, University of Minnesota
  https://grouplens.org/datasets/movielens/
Terms (the Usage License in the archive's README governs; in short):
  - research use only; no commercial or revenue-bearing use without
    permission from the GroupLens Research Project;
  - do not state or imply endorsement by the University of Minnesota or
    GroupLens;
  - acknowledge the data in publications: F. Maxwell Harper and Joseph A.
    Konstan. 2015. The MovieLens Datasets: History and Context. ACM TiiS
    5(4), Article 19;
  - redistribution: not without separate permission (100K, 1M); see the
    README of the latest releases for theirs;
  - no warranty of correctness or fitness for any purpose."""
AMAZON_TERMS = """\
Amazon Reviews 2023 ({category}), McAuley Lab, UC San Diego
  https://amazon-reviews-2023.github.io/
Terms: released by the lab for research (read the page above: it governs).
  The reviews and product data are Amazon's and its customers' content: use
  them for non-commercial research, do not redistribute the files, and cite:
  Yupeng Hou, Jiacheng Li, Zhankui He, An Yan, Xiusi Chen, Julian McAuley.
  2024. Bridging Language and Items for Retrieval and Recommendation.
  arXiv:2403.03952."""
GOOGLE_LOCAL_TERMS = """\
Google Local Data 2021 ({region}), McAuley Lab, UC San Diego
  https://mcauleylab.ucsd.edu/public_datasets/gdrive/googlelocal/
Terms: released by the lab for research (read the page above: it governs).
  The reviews are Google Maps users' content: use them for non-commercial
  research, do not redistribute the files, and cite: Jiacheng Li, Jingbo Shang, Julian
  McAuley. 2022. UCTopic (ACL 2022); An Yan, Zhankui He, Jiacheng Li, Tianyang
  Zhang, Julian McAuley. 2023. Personalized Showcases (SIGIR 2023)."""


class DownloadError(Exception):
  """A download that cannot go on; the message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class Remote:
  """One file of a data set.

  path: its path under the data set's base URL, and under --dir.
  md5: its published MD5 (hex), or "" for none.
  md5_file: the path (under the base URL) of a published `MD5 (name) = hex`
    file to read the MD5 from, or "".
  unzip: unpack it into --dir after the check.
  gzip: read its gzip stream through as the check.
  """
  path: str
  md5: str = ""
  md5_file: str = ""
  unzip: bool = False
  gzip: bool = False


@dataclasses.dataclass(frozen=True)
class DataSet:
  name: str
  base_url: str
  terms: str
  files: tuple[Remote, ...]
  config_dir: str  # what config.data.dir should name, relative to --dir


def command(name: str, directory: str) -> str:
  """The command line that fetches `name` into `directory`."""
  return f"python -m data.download {name} --dir {directory or '.'} --accept_terms"


def data_set(name: str, benchmark: str = "") -> DataSet:
  """The DataSet called `name`; a DownloadError lists the names on a typo."""
  if name in MOVIELENS:
    folder, md5 = MOVIELENS[name]
    return DataSet(name, MOVIELENS_BASE, MOVIELENS_TERMS.format(release=folder),
                   (Remote(f"{folder}.zip", md5=md5,
                           md5_file="" if md5 else f"{folder}.zip.md5",
                           unzip=True),), folder)
  family, _, part = name.partition(":")
  if family == "amazon2023" and part:
    return _amazon(part, benchmark)
  if family == "google_local" and part:
    region = part[:-len("_10")] if part.endswith("_10") else part
    return DataSet(name, GOOGLE_LOCAL_BASE, GOOGLE_LOCAL_TERMS.format(region=part),
                   (Remote(f"review-{part}.json.gz", gzip=True),
                    Remote(f"meta-{region}.json.gz", gzip=True)), "")
  raise DownloadError(f"unknown data set {name!r}; the names are "
                      f"{', '.join(list(MOVIELENS) + list(FAMILIES))}")


def _amazon(category: str, benchmark: str) -> DataSet:
  from data import amazon  # the category and benchmark names
  if category not in amazon.CATEGORIES:
    raise DownloadError(f"amazon2023:{category} is not a category of the "
                        f"release; the categories are {', '.join(amazon.CATEGORIES)}")
  files = [Remote(f"raw/review_categories/{category}.jsonl.gz", gzip=True),
           Remote(f"raw/meta_categories/meta_{category}.jsonl.gz", gzip=True)]
  if benchmark:
    if benchmark not in amazon.EVENTS[1:]:
      raise DownloadError(f"--benchmark={benchmark!r} is not one of "
                          f"{', '.join(amazon.EVENTS[1:])}")
    stems = ([category] if benchmark.endswith("rating_only") else
             [f"{category}.{part}" for part in amazon.SPLIT_PARTS])
    files += [Remote(f"benchmark/{benchmark}/{stem}.csv.gz", gzip=True)
              for stem in stems]
  return DataSet(f"amazon2023:{category}", AMAZON_BASE,
                 AMAZON_TERMS.format(category=category), tuple(files), "")


def local_path(directory: str, remote: Remote) -> str:
  """Where `remote` lands under `directory`: the raw review and metadata
  files flat in it (as the readers look for them), the rest as on the server."""
  path = remote.path
  if path.startswith("raw/"):
    path = os.path.basename(path)
  return os.path.join(directory, *path.split("/"))


# ----------------------------------------------------------------------------
# Fetching one file.

def fetch(url: str, dest: str, say=print) -> None:
  """Downloads `url` to `dest + ".part"`, resuming a part already there;
  returns with the part complete (the caller checks and renames it)."""
  part = dest + ".part"
  have = os.path.getsize(part) if os.path.exists(part) else 0
  request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"}
                                   if have else {})
  try:
    response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # nothing after what we have: the part is whole
      return
    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise DownloadError(f"cannot reach {url}: {reason} (no internet? a proxy? "
                        "--base_url names a mirror)") from None
  with response:
    resumed = response.status == 206
    if resumed and not _range_starts_at(response.headers.get("Content-Range", ""),
                                        have):
      raise DownloadError(f"{url}: asked for the bytes from {have:,}, the server "
                          "sent another range "
                          f"({response.headers.get('Content-Range')}); remove "
                          f"{part} and run the command again")
    if resumed:
      say(f"  resuming {os.path.basename(dest)} at byte {have:,}")
    elif have:
      say(f"  the server sent the whole file: starting {os.path.basename(dest)} "
          "again")
      have = 0
    length = response.headers.get("Content-Length")
    expected = have + int(length) if length is not None else None
    got = have
    with open(part, "ab" if resumed else "wb") as out:
      try:
        while chunk := response.read(CHUNK):
          out.write(chunk)
          got += len(chunk)
      except (OSError, ValueError) as e:  # the connection dropped mid-file
        raise DownloadError(f"{url}: the transfer stopped after {got:,} bytes "
                            f"({e}); run the command again to resume") from None
  if expected is not None and got < expected:
    raise DownloadError(f"{url}: the transfer stopped after {got:,} of "
                        f"{expected:,} bytes; run the command again to resume")


def _range_starts_at(content_range: str, start: int) -> bool:
  """Whether a `Content-Range: bytes a-b/n` header starts at `start`."""
  match = re.match(r"bytes (\d+)-", content_range)
  return bool(match) and int(match.group(1)) == start


def file_digest(path: str, algorithm: str) -> str:
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def published_md5(url: str) -> str:
  """The MD5 of a GroupLens `MD5 (name) = hex` file at `url`."""
  try:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
      text = response.read(4096).decode("ascii", "replace")
  except urllib.error.HTTPError as e:
    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, OSError) as e:
    raise DownloadError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
  match = re.search(r"\b([0-9a-fA-F]{32})\b", text)
  if not match:
    raise DownloadError(f"{url} holds no MD5 (expected 'MD5 (name) = <32 hex "
                        f"digits>', found {text.strip()[:60]!r})")
  return match.group(1).lower()


def check(path: str, remote: Remote, expected_md5: str, url: str) -> str:
  """Checks a downloaded file; returns what was checked, for the log. A
  mismatch removes the file and raises."""
  if expected_md5:
    actual = file_digest(path, "md5")
    if actual != expected_md5:
      os.remove(path)
      raise DownloadError(f"checksum mismatch for {url}: MD5 {actual}, published "
                          f"{expected_md5}; the download was removed: run the "
                          "command again (if it repeats, the server's file "
                          "changed: tell us)")
    return f"MD5 {actual} (published)"
  if remote.gzip:
    try:
      with gzip.open(path, "rb") as f:
        while f.read(CHUNK):
          pass
    except (OSError, EOFError, zlib.error) as e:
      os.remove(path)
      raise DownloadError(f"{url}: the file is not a whole gzip stream ({e}); "
                          "it was removed: run the command again") from None
    return f"gzip stream whole; SHA-256 {file_digest(path, 'sha256')}"
  return f"SHA-256 {file_digest(path, 'sha256')}"


def unpack(zip_path: str, directory: str) -> list[str]:
  """Unpacks a zip into `directory` through a temporary folder, each top-level
  entry renamed into place (one already there is kept); returns the entries."""
  staging = tempfile.mkdtemp(prefix=".unpacking-", dir=directory)
  try:
    with zipfile.ZipFile(zip_path) as archive:
      for member in archive.namelist():
        target = os.path.realpath(os.path.join(staging, member))
        if not target.startswith(os.path.realpath(staging) + os.sep):
          raise DownloadError(f"{zip_path}: entry {member!r} would unpack outside "
                              "the folder; not unpacking it")
      archive.extractall(staging)
    entries = sorted(os.listdir(staging))
    for entry in entries:
      final = os.path.join(directory, entry)
      if not os.path.exists(final):
        os.replace(os.path.join(staging, entry), final)
    return entries
  except zipfile.BadZipFile as e:
    raise DownloadError(f"{zip_path} is not a zip file ({e})") from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def download(data: DataSet, directory: str, base_url: str = "", say=print) -> None:
  """Fetches, checks and places every file of `data` under `directory`."""
  base = (base_url or data.base_url).rstrip("/") + "/"
  os.makedirs(directory, exist_ok=True)
  for remote in data.files:
    url, dest = base + remote.path, local_path(directory, remote)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    expected = remote.md5 or (published_md5(base + remote.md5_file)
                              if remote.md5_file else "")
    if os.path.exists(dest):
      say(f"{dest}: already there; checking it")
      say(f"  {check(dest, remote, expected, url)}")
    else:
      say(f"{url} -> {dest}")
      fetch(url, dest, say)
      say(f"  {check(dest + '.part', remote, expected, url)}")
      os.replace(dest + ".part", dest)
    if remote.unzip:
      entries = unpack(dest, directory)
      say(f"  unpacked: {', '.join(os.path.join(directory, e) for e in entries)}")
  where = os.path.join(directory, data.config_dir) if data.config_dir else directory
  say(f"done: point config.data.dir at {where}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m data.download", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", nargs="?", help="the data set: "
                      + ", ".join(list(MOVIELENS) + list(FAMILIES)))
  parser.add_argument("--dir", help="the folder to download into (created)")
  parser.add_argument("--accept_terms", action="store_true",
                      help="accept the data set's terms (printed first)")
  parser.add_argument("--benchmark", default="", help="amazon2023: also fetch "
                      "this benchmark variant, e.g. 5core/last_out_w_his")
  parser.add_argument("--base_url", default="", help="fetch from this server "
                      "instead of the data set's (a mirror; the tests' server)")
  parser.add_argument("--list", action="store_true", help="print the names")
  args = parser.parse_args(argv)
  if args.list:
    print("\n".join(list(MOVIELENS) + list(FAMILIES)))
    return 0
  try:
    if not args.name or not args.dir:
      raise DownloadError("give a data set name and --dir, e.g. "
                          + command("movielens-1m", "../shared/data"))
    if args.benchmark and not args.name.startswith("amazon2023:"):
      raise DownloadError("--benchmark is for amazon2023:<Category> only")
    data = data_set(args.name, args.benchmark)
    print(data.terms, flush=True)
    if not args.accept_terms:
      raise DownloadError("pass --accept_terms to accept the terms above and "
                          "download")
    print("terms accepted (--accept_terms)", flush=True)
    download(data, args.dir, args.base_url,
             say=lambda line: print(line, flush=True))
  except (DownloadError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted; run the command again to resume", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
