"""Metrics as JSON lines (`<workdir>/metrics.jsonl`) and TensorBoard event files
(`<workdir>/tensorboard/`, `tensorboard --logdir <workdir>`).

The event files are written with TensorBoard's own record writer and protocol
buffers, which need no TensorFlow: a training process never loads TF (faster
start-up, and no TF thread pools beside XLA's in one process).

Both are flushed at every write, so a kill loses no written row. In a workdir
on object storage (gs://..., infra/paths.py), where an object cannot be
appended to, each flush writes the whole file again as one object
(`paths.open_log`): TensorBoard (`tensorboard --logdir gs://...`, which
reads gs:// through TensorFlow's gfile) sees the events as of the last write.
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from infra import paths


class _EventFile:
  """One TensorBoard event file of scalar summaries."""

  def __init__(self, directory: str):
    paths.makedirs(directory)
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}")
    self._file = paths.open_log(paths.join(directory, name))  # a new name
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=value)
        for tag, value in values.items()])
    self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    self._records.flush()
    self._file.close()


class MetricWriter:
  """Writes `{step, split, name: value}` rows; a resumed run first drops the rows
  written after the step it resumes from, so the file never holds a step twice.
  Only process 0 writes (every process of a multi-host run has the same
  metrics)."""

  def __init__(self, workdir: str, resume_step: int = 0):
    import jax
    self.primary = jax.process_index() == 0
    self.path = paths.join(workdir, "metrics.jsonl")
    if not self.primary:
      return
    paths.makedirs(workdir)
    self._drop_rows_after(resume_step)
    self.rows = paths.open_log(self.path)
    self.summary = _EventFile(paths.join(workdir, "tensorboard"))

  def _drop_rows_after(self, step: int) -> None:
    """Keeps the rows up to `step`, rewritten atomically (a kill mid-rewrite
    leaves the old file). A line that does not parse (a write cut off by a
    kill) is dropped with a warning naming it; it never blocks a resume."""
    if not paths.exists(self.path):
      return
    kept, torn = [], []
    lines = paths.read_text(self.path).splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
      try:
        row = json.loads(line)
        row_step = row["step"]
      except (ValueError, KeyError, TypeError):
        torn.append(number)
        continue
      if row_step <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    if torn:
      print(f"[metrics] warning: dropped {len(torn)} unreadable line(s) of "
            f"{self.path} (line {', '.join(map(str, torn[:5]))}: cut off by a kill?)",
            flush=True)
    paths.write_text(self.path, "".join(kept))

  def write(self, step: int, split: str, metrics: dict) -> None:
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if not self.primary:
      return
    self.rows.write((json.dumps({"step": step, "split": split, **values})
                     + "\n").encode())
    self.rows.flush()
    self.summary.scalars(step, {f"{split}/{k}": v for k, v in values.items()})

  def close(self) -> None:
    if self.primary:
      self.rows.close()
      self.summary.close()
