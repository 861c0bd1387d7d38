"""What a round costs a client: the bytes it downloads and uploads, and the
FLOPs of its local update.

A task whose model has an item table (`params["item_embed"]["embedding"]`)
says how many of its rows a client reads (`task.rows_read(examples)`: the
items in its examples, or None when its loss or a regulariser reads every
row). Such a client needs only those rows and the dense parameters, and its
update is zero on every other row (tested for the retrieval task), so it sends
only those: bytes down = bytes up = dense bytes + rows x row bytes (indices
not counted). A task without an item table, or that reads every row, moves
the whole model both ways. FLOPs are XLA's cost analysis of one client's
compiled update (the client padded to the dataset's largest, as it runs).
Frozen weights (an LLM's base under adapters) never travel with a round.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn

from federated import algorithms


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _item_table(params):
  return params.get("item_embed", {}).get("embedding") if isinstance(params, dict) else None


def client_bytes(task, params, dataset) -> np.ndarray:
  """[clients] bytes each client of `dataset` downloads (= uploads) a round."""
  total = _bytes(params)
  table = _item_table(params)
  if table is None:
    return np.full(len(dataset), float(total))
  row_bytes = table.shape[1] * table.dtype.itemsize
  dense = total - table.shape[0] * row_bytes
  rows = [task.rows_read(examples[:count]) for examples, count in
          zip(dataset.examples, dataset.num_examples)]
  return np.asarray([dense + row_bytes * (table.shape[0] if r is None else r)
                     for r in rows], np.float64)


def client_flops(task, client_spec, params, client_state, dataset,
                 frozen=None) -> float:
  """FLOPs of one client's local update as XLA compiles it (`frozen`: the
  weights it reads but does not train, e.g. an LLM's base under adapters)."""
  update = jax.jit(algorithms.make_client_update(task.example_loss, client_spec))
  analysis = update.lower(params, client_state, dataset.examples[0],
                          dataset.num_examples[0], jax.random.PRNGKey(0), None,
                          frozen).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float((analysis or {}).get("flops", float("nan")))


def round_cost(task, client_spec, state, dataset) -> dict[str, float]:
  """results.json's cost entries: client_bytes_down/up (mean over clients),
  model_bytes, client_flops. A state with frozen weights (adapters over a
  frozen base: federated/frozen_base.py) moves only its params, the
  adapters; the base is read by every client (`frozen_bytes`, sent once
  before the first round, not every round)."""
  params = nn.meta.unbox(state.params)
  frozen = getattr(state, "frozen", None)
  client_state = jax.tree.map(lambda t: t[0], nn.meta.unbox(state.client_states))
  per_client = client_bytes(task, params, dataset)
  out = {"client_bytes_down": float(per_client.mean()),
         "client_bytes_up": float(per_client.mean()),
         "model_bytes": float(_bytes(params)),
         "client_flops": client_flops(task, client_spec, params, client_state,
                                      dataset, frozen)}
  if frozen is not None:
    out["frozen_bytes"] = float(_bytes(frozen))
  return out
