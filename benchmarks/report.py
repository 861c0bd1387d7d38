"""What every benchmark writes besides its JSON and markdown: a PNG figure
(matplotlib, headless), and the one-line description of the machine."""

from __future__ import annotations

import os
import platform

import jax
import matplotlib

matplotlib.use("Agg")  # no display on CI or TPU VMs
from matplotlib import pyplot as plt  # noqa: E402


def device() -> str:
  """e.g. "cpu (x86_64, 2 cores), jax 0.10.2"."""
  return (f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}; "
          f"{platform.machine()}, {os.cpu_count()} cores), jax {jax.__version__}")


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
  """(fig, axes list) of one row of `ncols` panels."""
  fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
  return fig, list(axes[0])


def save(fig, out: str) -> str:
  """Writes `<out>.png` (atomically) and closes the figure; returns its path."""
  path = out + ".png"
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  os.replace(path + ".tmp.png", path)
  plt.close(fig)
  return path


def with_overrides(config, overrides: dict):
  """A deep copy of `config` with {"section.field": value} set (what the
  settings of a benchmark change)."""
  import copy
  config = copy.deepcopy(config)
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
