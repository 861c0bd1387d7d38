"""The learning-curves command (benchmarks/report.py): it draws the losses
and evaluation metrics of several workdirs' metrics.jsonl into one PNG; the
benchmarks' figures (benchmarks/plots.py) and their modules' imports."""

import json
import subprocess
import sys

import pytest

from benchmarks import report


def _workdir(path, rows):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    f.write('{"step": 9, "spl')  # a line cut off by a kill is skipped
  return str(path)


def test_curves_draw_every_workdir_and_name_a_missing_metric(tmp_path):
  a = _workdir(tmp_path / "a", [{"step": s, "split": "train", "loss": 1.0 / s,
                                 "lr": 0.1} for s in (1, 2, 3)]
               + [{"step": 3, "split": "valid", "recall@10": 0.2}])
  b = _workdir(tmp_path / "b", [{"step": s, "split": "federated", "client_loss": 2.0 / s}
                                for s in (1, 2)])
  result = subprocess.run([sys.executable, "-m", "benchmarks.report", a, b, "--out",
                           str(tmp_path / "curves")], capture_output=True, text=True,
                          timeout=120, cwd=report.__file__.rsplit("/benchmarks", 1)[0])
  assert result.returncode == 0, result.stderr
  png = tmp_path / "curves.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  empty = _workdir(tmp_path / "c", [{"step": 1, "split": "train", "lr": 0.1}])
  with pytest.raises(SystemExit, match="no losses or evaluation metrics"):
    report.curves([empty], str(tmp_path / "none"))


def test_every_benchmark_module_imports_beside_every_other():
  """A benchmark defines no absl flag at import (the harness defines the
  shared flags and its own only when it runs), so any set of benchmark modules
  imports into one process: per-module `--out` and `--config` flags made a
  second import raise DuplicateFlagError (CI saw it with the RLPF benchmark
  beside the adapters one in one pytest worker)."""
  import importlib
  import importlib.util
  import pathlib
  from absl import flags
  root = pathlib.Path(report.__file__).parents[1]
  modules = [".".join(p.relative_to(root).with_suffix("").parts)
             for p in sorted((root / "benchmarks").glob("**/*.py"))]
  # the Flower peer runs in its own environment (requirements-peers.txt)
  if importlib.util.find_spec("flwr") is None:
    modules.remove("benchmarks.federated.flower_peer")
  # and RecBole's side of its peer in its own (requirements-recbole.txt)
  if importlib.util.find_spec("recbole") is None:
    modules.remove("benchmarks.userllm.recbole_runner")
  for name in modules:
    importlib.import_module(name)
  assert not [m for m in flags.FLAGS.flags_by_module_dict() if "benchmarks" in m]
  assert "out" not in flags.FLAGS and len(modules) > 15


def test_a_figure_has_at_most_two_panels_a_row():
  from benchmarks import plots
  fig, axes = plots.panels(5, width=4.0, height=3.0)
  assert len(axes) == 5
  width, height = fig.get_size_inches()
  assert (width, height) == (8.0, 9.0)  # 2 columns, 3 rows
  from matplotlib import pyplot as plt
  plt.close(fig)
