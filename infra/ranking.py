"""Full-ranking metrics: Recall@K and NDCG@K of a target among all candidates.

For each held-out row the target is ranked against every candidate that is not
excluded (callers exclude padding and, for next-item prediction, the items
already in the user's history, since MovieLens users rate a movie once; the
target itself is never excluded). Rank 0 is the top. Recall@K = [rank < K];
NDCG@K = 1/log2(rank + 2) if rank < K else 0 (one relevant item, ideal DCG 1).

A broken model never ranks well: a non-finite target score ranks the target
last, and a NaN candidate counts as scored above the target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def target_ranks(scores: jax.Array, targets: jax.Array, excluded: jax.Array
                 ) -> jax.Array:
  """Ranks of the targets.

  Args:
    scores: [batch, candidates] higher is better.
    targets: [batch] int candidate indices.
    excluded: [batch, candidates] bool, candidates that never outrank.

  Returns:
    [batch] int32, number of eligible candidates scored strictly above the
    target (NaN candidates count as above); the number of eligible candidates
    other than the target when the target's score is not finite.
  """
  candidate = jnp.arange(scores.shape[-1])
  is_target = candidate[None, :] == targets[:, None]
  eligible = ~excluded | is_target
  target_scores = jnp.take_along_axis(scores, targets[:, None], axis=1)
  above = eligible & ~is_target & ((scores > target_scores) | jnp.isnan(scores))
  last = jnp.sum(eligible & ~is_target, axis=1)
  ranks = jnp.where(jnp.isfinite(target_scores[:, 0]), jnp.sum(above, axis=1), last)
  return ranks.astype(jnp.int32)


def metrics_from_ranks(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """Mean Recall@K and NDCG@K over `ranks` ([n] ints, one held-out event
  each), with the standard error of each mean (`recall@K_stderr`; 0 for n < 2)."""
  ranks = np.asarray(ranks)
  out = {}
  for k in ks:
    hit = ranks < k
    gain = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    for name, values in ((f"recall@{k}", hit.astype(np.float64)), (f"ndcg@{k}", gain)):
      out[name] = float(values.mean())
      out[f"{name}_stderr"] = (float(values.std(ddof=1) / np.sqrt(len(values)))
                               if len(values) > 1 else 0.0)
  return out


def popularity_scores(train_item_ids: np.ndarray, vocab: int, seed: int = 0
                      ) -> np.ndarray:
  """[vocab] training-count scores; ties broken by a fixed random jitter < 1."""
  counts = np.bincount(train_item_ids, minlength=vocab).astype(np.float64)
  return counts + 0.5 * np.random.default_rng(seed).random(vocab)
