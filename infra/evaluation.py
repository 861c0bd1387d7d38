"""The one evaluator protocol and the padded-batch loop every evaluator uses.

An evaluator is built once per held-out set and called with parameters:

    evaluator.evaluate(params) -> {"<split>/<scorer>/<task>/<metric>": value}

(the key scheme of `infra/results.py`). `fit` calls it periodically through
`eval_fn`, workflows call it at the end; baselines that ignore the parameters
(popularity, priors) are scorers of the same evaluator.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np


class Evaluator(Protocol):

  def evaluate(self, params) -> dict[str, float]:
    """Flat `<split>/<scorer>/<task>/<metric>` -> value."""


def padded_rows(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Row ids of fixed-size batches over n rows: ([batch_size] ids, real count).

  The last batch repeats its last row to keep the shape (one compilation);
  callers keep the first `real` results of each batch.
  """
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    yield np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])]), len(rows)
