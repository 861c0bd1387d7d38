"""The RecBole side-by-side benchmark (benchmarks/userllm/recbole_peer.py):
the exported .inter file, read back in time order as RecBole's leave-one-out
reads it, holds out exactly our leave-last-out events; with RecBole
installed (requirements-recbole.txt, its own venv) the tiny run goes end to
end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from data import splits


def test_the_exported_events_hold_out_our_test_and_valid_events(tmp_path,
                                                               tiny_timelines):
  from benchmarks.userllm import recbole_peer
  path = tmp_path / "d" / "d.inter"
  recbole_peer.write_inter(tiny_timelines, str(path))
  lines = path.read_text().splitlines()
  assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
  rows = np.asarray([[float(x) for x in line.split("\t")] for line in lines[1:]])
  assert len(rows) == len(tiny_timelines.item_ids)
  split = splits.leave_last_out(tiny_timelines)
  # RecBole's LS split, order TO: per user, by timestamp, last = test,
  # second-to-last = valid
  by_user = {}
  for user, item, stamp in rows:
    by_user.setdefault(int(user) - 1, []).append((stamp, int(item)))
  for held_out, back in ((split.test, 1), (split.valid, 2)):
    for user, target in zip(held_out.users, held_out.targets):
      events = sorted(by_user[int(user)])
      assert events[-back][1] == target


def test_users_with_too_few_events_are_refused(tiny_timelines):
  from benchmarks.userllm import recbole_peer
  from infra.errors import ConfigError
  recbole_peer.check_split(tiny_timelines)  # every tiny user has 8+
  short = tiny_timelines.__class__(**{
      **tiny_timelines.__dict__,
      "user_offsets": np.concatenate([[0, 2], tiny_timelines.user_offsets[1:]
                                      [tiny_timelines.user_offsets[1:] > 2]])})
  with pytest.raises(ConfigError, match="fewer than 3 events"):
    recbole_peer.check_split(short)


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
  from benchmarks.userllm import recbole_peer
  out = str(tmp_path / "recbole_0.npz")
  settings = {"model": "SASRec", "seed": 0, "epochs": 3, "inter_sha256": "ab"}
  assert recbole_peer.finished_run(out, settings) is None  # nothing there
  np.savez(out, scores=np.zeros((1, 1)))
  assert recbole_peer.finished_run(out, settings) is None  # no sidecar: unfinished
  (tmp_path / "recbole_0.npz.json").write_text(json.dumps(
      {"settings": settings, "cpu_seconds": 12.5}))
  assert recbole_peer.finished_run(out, settings)["cpu_seconds"] == 12.5
  for changed in ({**settings, "epochs": 4}, {**settings, "inter_sha256": "cd"}):
    assert recbole_peer.finished_run(out, changed) is None
  for broken in ("{half", "[1, 2]"):  # a torn or foreign sidecar: not finished
    (tmp_path / "recbole_0.npz.json").write_text(broken)
    assert recbole_peer.finished_run(out, settings) is None


RECBOLE = os.path.join(REPO, ".venv-recbole", "bin", "python")


@pytest.mark.skipif(not os.path.exists(RECBOLE),
                    reason="RecBole's venv (requirements-recbole.txt) is not here")
def test_the_tiny_side_by_side_runs(tmp_path):
  command = [sys.executable, "-m", "benchmarks.userllm.recbole_peer", "--tiny",
             "--datasets=synthetic", "--seeds=0,1", "--epochs=1",
             "--stopping_step=1", "--out", str(tmp_path / "out"), "--runs_dir",
             str(tmp_path / "runs")]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "RecBole SASRec" in (tmp_path / "out.md").read_text()
  first = json.loads((tmp_path / "out.json").read_text())["rows"]["synthetic"]
  assert first["recbole_reused"] == [False, False]
  # the same command again reuses RecBole's finished runs: same scores, same CPU
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stderr[-2000:]
  second = json.loads((tmp_path / "out.json").read_text())["rows"]["synthetic"]
  assert second["recbole_reused"] == [True, True]
  assert second["recbole_sasrec"] == first["recbole_sasrec"]
  assert second["recbole_cpu_seconds"] == first["recbole_cpu_seconds"]
  # RecBole's logs stay beside its outputs, out of the repository
  assert not os.path.exists(os.path.join(REPO, "log_tensorboard"))
