"""What the RLPF benchmarks that read finished runs share: the `--runs` flag
(`name=workdir,...` of `python main.py --config configs/rlpf.py ...` runs),
the table's row and task labels, and reading a run's results and RL curve."""

from __future__ import annotations

import json
import os

from benchmarks import harness, report
from infra.errors import ConfigError

RUNS = harness.Flag("runs", "synthetic=runs/rlpf_syn",
                    "name=workdir,... of finished rlpf runs.")
ROW_LABELS = {
    "none": "no context", "full_history": "full history (N events)",
    "last_k": "last-k events at RLPF's budget",
    "random_k": "random-k events at RLPF's budget",
    "first_k": "first-k events at RLPF's budget",
    "initial_policy": "initial policy's summary",
    "hierarchical": "time-hierarchical summarizer",
    "hierarchical_verified": "hierarchical + verifier", "rlpf": "RLPF summary"}
TASKS = (("next_title", "next title (RL task)"), ("favourite_genre", "favourite genre"),
         ("rating", "rating"), ("future_genre", "future genre"),
         ("quality", "UserSumBench quality"))


def workdirs(spec: str) -> dict[str, str]:
  """`name=workdir,...` -> {name: workdir}, in the order given."""
  out = {}
  for item in spec.split(","):
    name, sep, workdir = item.partition("=")
    if not (sep and name and workdir):
      raise ConfigError(f"--runs: {item!r} is not name=workdir")
    out[name] = workdir
  return out


def read_results(workdir: str) -> dict:
  """A finished run's `<workdir>/results.json`."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no results (is the run finished?)")
  with open(path) as f:
    return json.load(f)


def test_rows(results: dict) -> dict[str, dict]:
  """{row: {figure: value}} of a run's test figures: from the house keys
  `test/<row>/<task>/<metric>` (summarize.table.rows_of), or from the
  `test/<row>/<figure>` keys of runs finished before them."""
  from summarize import table
  rows = table.rows_of(results)
  if rows:
    return rows
  for key, value in results.items():
    if key.startswith("test/") and key.count("/") == 2:
      _, row, figure = key.split("/")
      rows.setdefault(row, {})[figure] = value
  return rows


def read_run(workdir: str) -> dict:
  """{"rows": {row: {figure: value}} of the test figures, "curve": the RL
  stage's metrics.jsonl rows, "test_users", "length_target", "config": its
  data, rl, summary and rl_train sections}."""
  results = read_results(workdir)
  return {"rows": test_rows(results), "curve": report.read_metrics(os.path.join(workdir, "rlpf")),
          "test_users": results["test_users"],
          "length_target": results["length_target"],
          "config": {k: results["config"][k] for k in ("data", "rl", "summary", "rl_train")}}
