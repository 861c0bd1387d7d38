"""Metrics as JSON lines (`<workdir>/metrics.jsonl`) and TensorBoard summaries.

TensorBoard summaries go through clu, which needs TensorFlow. On a machine
without it (a bare GPU image, say) the writer says so once and keeps the JSON
lines, which hold every value.
"""

from __future__ import annotations

import json
import os

import numpy as np


def _summary_writer(directory: str):
  try:
    from clu import metric_writers
  except ImportError as e:  # clu or TensorFlow missing
    print(f"[metrics] TensorBoard summaries off ({e}); metrics.jsonl has every "
          "value", flush=True)
    return None
  return metric_writers.SummaryWriter(directory)


class MetricWriter:
  """Writes `{step, split, name: value}` rows; a resumed run first drops the rows
  written after the step it resumes from, so the file never holds a step twice."""

  def __init__(self, workdir: str, resume_step: int = 0):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._drop_rows_after(resume_step)
    self.summary = _summary_writer(os.path.join(workdir, "tensorboard"))

  def _drop_rows_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def write(self, step: int, split: str, metrics: dict) -> None:
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    if self.summary is not None:
      self.summary.write_scalars(step, {f"{split}/{k}": v for k, v in values.items()})

  def close(self) -> None:
    if self.summary is not None:
      self.summary.flush()
      self.summary.close()
