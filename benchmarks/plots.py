"""The benchmarks' figures: panels at most two to a row, so a figure reads at
screen width (a row of six panels does not), drawn headless and saved
atomically as `<out>.png`."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # no display on CI or TPU VMs
from matplotlib import pyplot as plt  # noqa: E402

COLUMNS = 2  # the most panels side by side


def panels(count: int, width: float = 5.0, height: float = 3.6):
  """(fig, axes list) of `count` panels, at most `COLUMNS` to a row; each
  panel `width` x `height` inches (unused grid cells are hidden)."""
  if count < 1:
    raise ValueError(f"a figure needs at least one panel, got {count}")
  columns = min(count, COLUMNS)
  rows = -(-count // columns)
  fig, grid = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                           squeeze=False)
  axes = list(grid.ravel())
  for ax in axes[count:]:
    ax.axis("off")
  return fig, axes[:count]


def save(fig, out: str) -> str:
  """Writes `<out>.png` (through a temporary file and a rename) and closes the
  figure; returns its path."""
  path = out + ".png"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  os.replace(path + ".tmp.png", path)
  plt.close(fig)
  return path
