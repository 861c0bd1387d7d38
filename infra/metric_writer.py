"""Metrics as JSON lines (`<workdir>/metrics.jsonl`) and TensorBoard summaries."""

from __future__ import annotations

import json
import os

import numpy as np
from clu import metric_writers


class MetricWriter:
  """Writes `{step, split, name: value}` rows; a resumed run first drops the rows
  written after the step it resumes from, so the file never holds a step twice."""

  def __init__(self, workdir: str, resume_step: int = 0):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._drop_rows_after(resume_step)
    self.summary = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

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
    self.summary.write_scalars(step, {f"{split}/{k}": v for k, v in values.items()})

  def close(self) -> None:
    self.summary.flush()
    self.summary.close()
