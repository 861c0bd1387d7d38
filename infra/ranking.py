"""Full-ranking next-item metrics: Recall@K and NDCG@K over every item.

For each held-out event the target is ranked against all items, excluding the
padding item and the items already in the user's history (MovieLens users rate a
movie once, so a seen item is never the answer; the target itself is never
excluded). Rank 0 is the top. Recall@K = [rank < K]; NDCG@K = 1/log2(rank + 2)
if rank < K else 0 (one relevant item, so the ideal DCG is 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data.timelines import PAD_ITEM


def target_ranks(scores: jax.Array, targets: jax.Array, seen: jax.Array
                 ) -> jax.Array:
  """Ranks of the targets.

  Args:
    scores: [batch, num_items + 1] higher is better.
    targets: [batch] int item indices.
    seen: [batch, num_items + 1] bool, items to exclude.

  Returns:
    [batch] int32, number of eligible items scored strictly above the target.
  """
  item = jnp.arange(scores.shape[-1])
  excluded = (seen & (item[None, :] != targets[:, None])) | (item == PAD_ITEM)
  scores = jnp.where(excluded, -jnp.inf, scores)
  target_scores = jnp.take_along_axis(scores, targets[:, None], axis=1)
  return jnp.sum(scores > target_scores, axis=1).astype(jnp.int32)


def metrics_from_ranks(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """Mean Recall@K and NDCG@K over `ranks` ([n] ints)."""
  ranks = np.asarray(ranks)
  out = {}
  for k in ks:
    hit = ranks < k
    out[f"recall@{k}"] = float(hit.mean())
    out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
  return out


def seen_mask(histories: list[np.ndarray], num_rows: int, vocab: int
              ) -> np.ndarray:
  """[num_rows, vocab] bool with row i marking histories[i]; extra rows empty."""
  mask = np.zeros((num_rows, vocab), bool)
  for row, items in enumerate(histories):
    mask[row, items] = True
  return mask


def popularity_scores(train_item_ids: np.ndarray, vocab: int, seed: int = 0
                      ) -> np.ndarray:
  """[vocab] training-count scores; ties broken by a fixed random jitter < 1."""
  counts = np.bincount(train_item_ids, minlength=vocab).astype(np.float64)
  return counts + 0.5 * np.random.default_rng(seed).random(vocab)
