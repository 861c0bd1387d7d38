"""A gs:// workdir end to end, against a local GCS emulator
(gcp-storage-emulator, in memory on a free 127.0.0.1 port, started here):
main.py trains into gs://<bucket>/runs/x, is preempted (stop_after_steps:
exit 0 with a checkpoint), resumes from that step and writes results.json,
workflow.json, metrics.jsonl, TensorBoard events and checkpoints into the
bucket and nothing locally; a run of another workflow is refused in one line;
the lock is a create-if-absent object (infra/workdir.py, infra/paths.py).

Only this test sets emulator variables (`emulator_env`), in main.py's
environment alone; https traffic goes to a closed local proxy port, so a
request meant for Google fails instead of leaving the machine.

The emulator lacks two behaviours of GCS that the code under test relies on,
added here as GCS documents them (`_like_gcs`): a download carries the
object's generation (`x-goog-generation`; TensorStore reads it, and without
it a second checkpoint's write fails with "Malformed StorageGeneration"), and
an upload with `ifGenerationMatch` is refused with HTTP 412 unless the object's
generation is that one (0: absent), the precondition the lock's
create-if-absent write sends.
"""

import functools
import json
import os
import socket
import struct
import subprocess
import sys
import urllib.parse
import urllib.request
from http import HTTPStatus

import pytest

from conftest import REPO

BUCKET = "test-workdirs"
CONFIG = os.path.join(REPO, "configs", "default.py") + ":tiny"


# --- the emulator -------------------------------------------------------------

def _like_gcs(objects) -> dict:
  """The emulator's download and upload handlers with the two GCS behaviours
  of the module docstring: {original: wrapped}."""
  from gcp_storage_emulator.exceptions import NotFound

  def generation(storage, bucket, name) -> str:
    try:
      return storage.get_file_obj(bucket, name)["generation"]
    except NotFound:
      return "0"

  def download(original):
    @functools.wraps(original)
    def handler(request, response, storage, *args, **kwargs):
      original(request, response, storage, *args, **kwargs)
      if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        response["x-goog-generation"] = generation(
            storage, request.params["bucket_name"], request.params["object_id"])
        response["x-goog-metageneration"] = "1"
    return handler

  def upload(original):
    @functools.wraps(original)
    def handler(request, response, storage, *args, **kwargs):
      wanted = request.query.get("ifGenerationMatch")
      if wanted and "upload_id" not in request.query:  # a new upload
        meta = request.data if isinstance(request.data, dict) else {}
        name = (request.query.get("name") or [None])[0] or \
            meta.get("meta", meta).get("name")
        if generation(storage, request.params["bucket_name"], name) != wanted[0]:
          response.status = HTTPStatus.PRECONDITION_FAILED
          response.json({"error": {"code": 412, "message": "conditionNotMet"}})
          return
      return original(request, response, storage, *args, **kwargs)
    return handler

  return {objects.download: download(objects.download),
          objects.insert: upload(objects.insert)}


def _set_handlers(objects, handlers, replace: dict) -> None:
  """Puts `replace`'s values in place of its keys in the routing table and
  the module (whose `get` and router call `download` and `insert` by name)."""
  for _, methods in handlers:
    for method, handler in list(methods.items()):
      methods[method] = replace.get(handler, handler)
  for name in ("download", "insert"):
    setattr(objects, name, replace.get(getattr(objects, name),
                                       getattr(objects, name)))


@pytest.fixture(scope="module")
def emulator():
  """The emulator's URL while it serves in this process (one thread)."""
  try:
    from gcp_storage_emulator import server as emulator_server
    from gcp_storage_emulator.handlers import objects
  except ImportError as e:
    pytest.skip(f"gcp-storage-emulator is not installed ({e}); it is in "
                "requirements.txt")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  wrapped = _like_gcs(objects)
  _set_handlers(objects, emulator_server.HANDLERS, wrapped)
  try:
    server = emulator_server.create_server("127.0.0.1", port, in_memory=True)
    server.start()
  except OSError as e:
    _set_handlers(objects, emulator_server.HANDLERS,
                  {w: o for o, w in wrapped.items()})
    pytest.skip(f"gcp-storage-emulator cannot start on 127.0.0.1:{port}: {e}")
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.stop()
    _set_handlers(objects, emulator_server.HANDLERS,
                  {w: o for o, w in wrapped.items()})


def emulator_env(url: str) -> dict:
  """main.py's environment: the emulator for gcsfs (etils' gs:// backend)
  and TensorStore (orbax's arrays), no credential lookups, and no way out.
  EPATH_USE_TF is left to the project's own default (infra/paths.py)."""
  env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}
  closed = "http://127.0.0.1:9"  # the discard port: nothing listens
  env.update({
      "STORAGE_EMULATOR_HOST": url,  # gcsfs
      "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore's token
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
      # gcsfs would ask the Storage Control API (on Google, over gRPC) for
      # the bucket's type, which the emulator does not serve
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "https_proxy": closed, "HTTPS_PROXY": closed, "http_proxy": closed,
      "HTTP_PROXY": closed, "no_proxy": "127.0.0.1,localhost",
      "NO_PROXY": "127.0.0.1,localhost",
  })
  return env


class Bucket:
  """The bucket through the emulator's JSON API (plain HTTP)."""

  def __init__(self, url: str, name: str):
    self.url, self.name = url, name

  def _call(self, method: str, path: str, data: bytes | None = None,
            content_type: str = "application/json") -> bytes:
    request = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
      return response.read()

  def create(self) -> None:
    self._call("POST", "/storage/v1/b?project=test",
               json.dumps({"name": self.name}).encode())

  def names(self, prefix: str) -> list[str]:
    """Every object name under `prefix`, relative to it."""
    query = urllib.parse.urlencode({"prefix": prefix})
    listing = json.loads(self._call("GET", f"/storage/v1/b/{self.name}/o?{query}"))
    return sorted(item["name"][len(prefix):] for item in listing.get("items", []))

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    return self._call("GET", f"/storage/v1/b/{self.name}/o/{quoted}?alt=media")

  def write(self, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._call("POST", f"/upload/storage/v1/b/{self.name}/o?{query}", data,
               "application/octet-stream")


@pytest.fixture(scope="module")
def bucket(emulator):
  made = Bucket(emulator, BUCKET)
  made.create()
  return made


def run_main(emulator, cwd, *args, config=CONFIG):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "main.py"), "--config", config, *args],
      cwd=cwd, env=emulator_env(emulator), capture_output=True, text=True,
      timeout=600)


def event_scalars(data: bytes) -> dict[str, list[int]]:
  """{tag: steps} of a TensorBoard event file's bytes (TFRecord framing:
  length u64, its crc u32, the Event, the Event's crc u32)."""
  from tensorboard.compat.proto import event_pb2
  tags, offset = {}, 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append(event.step)
  return tags


# --- the tests -----------------------------------------------------------------

def test_a_gs_workdir_trains_is_preempted_resumes_and_writes_results(
    emulator, bucket, tmp_path):
  workdir = f"gs://{BUCKET}/runs/x"
  stopped = run_main(emulator, tmp_path, "--workdir", workdir,
                     "--config.train.stop_after_steps=3")
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert "stopped at step 3 of 6" in stopped.stderr
  names = bucket.names("runs/x/")
  assert "checkpoints/3/commit_success.txt" in names, names  # orbax's commit
  assert "workflow.json" in names
  assert "results.json" not in names and "run.lock" not in names

  finished = run_main(emulator, tmp_path, "--workdir", workdir)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert f"[train] resumed from {workdir}/checkpoints at step 3" in finished.stdout
  names = bucket.names("runs/x/")
  results = json.loads(bucket.read("runs/x/results.json"))
  assert results["steps"] == 6 and results["config"]["workflow"] == "next_item"
  assert 0.0 <= results["test/model/next_item/recall@10"] <= 1.0
  assert json.loads(bucket.read("runs/x/workflow.json")) == {"workflow": "next_item"}
  assert {"checkpoints/3/commit_success.txt",
          "checkpoints/6/commit_success.txt"} <= set(names), names
  assert "run.lock" not in names  # released at the end
  rows = [json.loads(line) for line in
          bucket.read("runs/x/metrics.jsonl").decode().splitlines()]
  train_steps = [row["step"] for row in rows if row["split"] == "train"]
  assert train_steps == [2, 3, 4, 6]  # logs of both runs, no step twice
  events = [n for n in names if n.startswith("tensorboard/events.out.tfevents.")]
  assert len(events) == 2, names  # one file per run
  scalars = [event_scalars(bucket.read(f"runs/x/{n}")) for n in events]
  assert sorted(s["train/loss"] for s in scalars) == [[2, 3], [4, 6]]
  # nothing local: no `gs:` folder, no file at all where main.py ran
  assert os.listdir(tmp_path) == []

  other = run_main(emulator, tmp_path, "--workdir", workdir,
                   config=os.path.join(REPO, "configs", "fedavg.py") + ":tiny")
  assert other.returncode == 2
  assert other.stderr.strip() == (
      f"error: --workdir={workdir} holds a next_item run and this config's "
      "workflow is federated; nothing was written: use another --workdir for "
      "federated, or a next_item config to resume that run"), other.stderr[-3000:]
  assert bucket.names("runs/x/") == names  # refused with nothing touched


def test_a_gs_lock_is_created_only_if_absent(emulator, bucket, tmp_path):
  """A lock object of a run on another host (as a run killed with its VM
  leaves): the create-if-absent write is refused by the bucket, so the run
  stops in one line, naming the holder, with nothing written."""
  holder = {"pid": 4242, "host": "another-vm", "since": "Mon Jan 15 00:00:00 2024"}
  bucket.write("runs/held/run.lock", json.dumps(holder).encode())
  workdir = f"gs://{BUCKET}/runs/held"
  held = run_main(emulator, tmp_path, "--workdir", workdir)
  assert held.returncode == 2
  assert held.stderr.strip() == (
      f"error: {workdir} is in use by process 4242 on another-vm since "
      f"{holder['since']}; wait for it, use another --workdir, or delete "
      f"{workdir}/run.lock if that run is gone"), held.stderr[-3000:]
  assert bucket.names("runs/held/") == ["run.lock"]
  assert json.loads(bucket.read("runs/held/run.lock")) == holder


def test_local_paths_keep_their_behaviour(tmp_path, monkeypatch):
  """The same layer on a local directory: absolute paths, writes through a
  temporary file and a rename, O_EXCL creation, appends."""
  from infra import paths
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert paths.resolve("gs://b/runs/x/") == "gs://b/runs/x"
  assert paths.join("gs://b/runs/x", "checkpoints") == "gs://b/runs/x/checkpoints"
  paths.write_text("runs/x/results.json", "{}")  # makes its directory
  assert os.listdir("runs/x") == ["results.json"]  # the .tmp renamed away
  paths.create_new("runs/x/run.lock", "mine")
  with pytest.raises(FileExistsError):
    paths.create_new("runs/x/run.lock", "theirs")
  assert paths.read_text("runs/x/run.lock") == "mine"
  for row in (b"a\n", b"b\n"):
    with paths.open_log("runs/x/metrics.jsonl") as log:
      log.write(row)
  assert paths.read_bytes("runs/x/metrics.jsonl") == b"a\nb\n"
  made = []

  def make(path):
    made.append(path)
    paths.write_text(path, "model")

  for _ in range(2):  # made once, then found
    assert paths.local_file("runs/x/spm.model", make) == "runs/x/spm.model"
  assert made == ["runs/x/spm.model"]


VOCABULARY_SCRIPT = """
import json, os, sys
from configs import user_llm
from data import prompts, sources
from userllm import language_model

config = user_llm.get_config("tiny")
timelines = sources.load_timelines(config.data, quiet=True)
trained = []

def corpus():
  trained.append(1)
  return prompts.corpus(timelines)

paths = [language_model.tokenizer(config, sys.argv[1], corpus).path
         for _ in range(2)]
print(json.dumps({"trained": len(trained), "paths": paths,
                  "local": [os.path.isfile(p) for p in paths]}))
"""


def test_a_vocabulary_trained_for_a_gs_workdir_is_kept_in_it(
    emulator, bucket, tmp_path):
  """SentencePiece writes and reads local files: `<workdir>/spm.model` is
  trained locally once, uploaded, and read from local copies."""
  made = subprocess.run(
      [sys.executable, "-c", VOCABULARY_SCRIPT, f"gs://{BUCKET}/runs/vocab"],
      cwd=REPO, env=emulator_env(emulator), capture_output=True, text=True,
      timeout=600)
  assert made.returncode == 0, made.stderr[-3000:]
  report = json.loads(made.stdout.strip().splitlines()[-1])
  assert report["trained"] == 1 and report["local"] == [True, True], report
  assert bucket.names("runs/vocab/") == ["spm.model"]
  with open(report["paths"][1], "rb") as f:
    assert f.read() == bucket.read("runs/vocab/spm.model")
