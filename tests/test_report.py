"""The learning-curves command (benchmarks/report.py): it draws the losses
and evaluation metrics of several workdirs' metrics.jsonl into one PNG."""

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


def test_the_tests_import_at_most_one_benchmark_that_defines_absl_flags():
  """A benchmark defines its absl flags (--out, --config...) on import, and two
  such benchmarks in one pytest worker raise DuplicateFlagError: whichever test
  file a worker loads second fails (CI saw it with benchmarks.rlpf beside
  benchmarks.adapters). Logic a test needs lives in the library instead."""
  import pathlib
  import re
  root = pathlib.Path(report.__file__).parents[1]
  defines_flags = {p.stem for p in (root / "benchmarks").glob("*.py")
                   if re.search(r"^\w+ = (flags|config_flags)\.DEFINE", p.read_text(), re.M)}
  imported = set()
  for test_file in (root / "tests").glob("*.py"):
    source = test_file.read_text()
    imported |= set(re.findall(r"from benchmarks import (\w+)", source))
    imported |= set(re.findall(r"import benchmarks\.(\w+)", source))
  assert "report" not in defines_flags and "adapters" in defines_flags
  assert len(imported & defines_flags) <= 1, sorted(imported & defines_flags)
