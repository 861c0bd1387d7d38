"""The one results writer: `results.json` of a run, and the JSON and the
markdown tables of a benchmark (benchmarks/harness.py), every file written
atomically (a reader never sees half a file), to a local path or to object
storage (gs://...: infra/paths.py).

Result keys follow one scheme, `<split>/<scorer>/<task>/<metric>` (e.g.
`test/model/next_item/recall@10`, `test/popularity/next_item/ndcg@10`,
`out_of_sample/model/next_item/recall@10_p90`); facts about the run (steps,
seconds, sizes) are plain names without a slash.
"""

from __future__ import annotations

import json
from typing import Iterable

from infra import paths


def key(split: str, scorer: str, task: str, metric: str) -> str:
  """`<split>/<scorer>/<task>/<metric>`."""
  return f"{split}/{scorer}/{task}/{metric}"


def prefixed(metrics: dict, split: str, scorer: str, task: str) -> dict:
  """{metric: v} -> {`<split>/<scorer>/<task>/<metric>`: v}."""
  return {key(split, scorer, task, name): value for name, value in metrics.items()}


def write_json(path: str, payload, sort_keys: bool = True) -> None:
  """Writes `payload` as indented JSON atomically (`paths.write_text`: a local
  file through a temporary file and a rename, an object in one upload);
  `sort_keys=False` keeps the dicts' order, e.g. a table's rows as run."""
  paths.write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys))


def write_results(workdir: str, metrics: dict, config) -> dict[str, float]:
  """`<workdir>/results.json`: the metrics as floats and the config that ran
  (written by process 0 only; every process returns them)."""
  import jax
  results = {k: float(v) for k, v in metrics.items()}
  if jax.process_index() == 0:
    write_json(paths.join(workdir, "results.json"),
               {**results, "config": config.to_dict()})
  return results


def markdown_table(header: Iterable[str], rows: Iterable[Iterable]) -> list[str]:
  """A GitHub markdown table; cells are written as given (format them first)."""
  header = list(header)
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def write_markdown(path: str, lines: list[str]) -> None:
  """Writes markdown `lines` to `path` atomically (as `write_json`)."""
  paths.write_text(path, "\n".join(lines) + "\n")
