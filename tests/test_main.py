"""main.py end to end: results.json, resume, and one-line config errors."""

import json
import os
import subprocess
import sys

from conftest import REPO


def run_main(*args):
  return subprocess.run([sys.executable, "main.py", "--config", "configs/default.py:tiny",
                         *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600)


def test_main_writes_results_and_resumes(tmp_path):
  first = run_main("--workdir", str(tmp_path))
  assert first.returncode == 0, first.stderr[-2000:]
  results = json.load(open(tmp_path / "results.json"))
  assert results["steps"] == 6
  assert 0.0 <= results["test/model/next_item/recall@10"] <= 1.0
  assert "test/popularity/next_item/ndcg@10" in results
  assert results["config"]["workflow"] == "next_item"
  # each step carries its config identity in its own metadata (infra/checkpoint.py)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  assert json.load(open(tmp_path / "workflow.json")) == {"workflow": "next_item"}
  assert os.path.isdir(tmp_path / "tensorboard")

  again = run_main("--workdir", str(tmp_path), "--config.train.num_steps=8")
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resumed from" in again.stdout and "at step 6" in again.stdout
  assert json.load(open(tmp_path / "results.json"))["steps"] == 8

  changed = run_main("--workdir", str(tmp_path), "--config.train.learning_rate=0.5")
  _one_line_error(changed, "was trained under another config (train.learning_rate:")
  assert changed.returncode == 2
  assert not (tmp_path / "results.json").exists()  # a failed rerun leaves none
  assert not (tmp_path / "run.lock").exists()


def test_a_diverging_run_is_an_error_with_no_results(tmp_path):
  diverged = run_main("--workdir", str(tmp_path), "--config.train.learning_rate=1e38",
                      "--config.train.grad_clip=0")
  _one_line_error(diverged, "[train] step ", "training went non-finite")
  assert diverged.returncode == 2 and not (tmp_path / "results.json").exists()
  afile = tmp_path / "afile"
  afile.write_text("x")
  _one_line_error(run_main("--workdir", str(afile)), f"--workdir={afile} is a file")


def _one_line_error(result, *needles):
  assert result.returncode != 0
  for needle in needles:
    assert needle in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_unknown_workflow(tmp_path):
  _one_line_error(run_main("--workdir", str(tmp_path), "--config.workflow=nope"),
                  "config.workflow='nope'")


def test_unknown_field(tmp_path):
  _one_line_error(run_main("--workdir", str(tmp_path), "--config.train.bogus=1"),
                  "bogus")


def test_ill_typed_field(tmp_path):
  _one_line_error(run_main("--workdir", str(tmp_path),
                           "--config.train.num_steps=many"), "num_steps")


def test_missing_data_dir(tmp_path):
  _one_line_error(run_main("--workdir", str(tmp_path),
                           "--config.data.source=movielens",
                           "--config.data.dir=/nonexistent/ml"),
                  "config.data.dir='/nonexistent/ml'")


def test_mesh_that_does_not_fit_the_devices(tmp_path):
  _one_line_error(run_main("--workdir", str(tmp_path), "--config.mesh.model=3"),
                  "config.mesh.model=3")


def test_unknown_config_variant(tmp_path):
  result = subprocess.run([sys.executable, "main.py", "--config",
                           "configs/default.py:huge", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  _one_line_error(result, "unknown config variant 'huge'")


def test_data_dir_with_synthetic_source(tmp_path):
  _one_line_error(run_main("--workdir", str(tmp_path), "--config.data.dir=/x"),
                  "config.data.dir='/x' is set but config.data.source='synthetic'")


def test_bad_schedule_value(tmp_path):
  _one_line_error(run_main("--workdir", str(tmp_path),
                           "--config.train.log_every=0"),
                  "config.train.log_every=0 must be >= 1")
