"""The retrieval dual encoder and its losses (Ning et al., "Learning Federated
Representations and Recommendations with Limited Negatives", arXiv 2108.07931).

Two towers over one shared item table E [vocab, d] (row 0 = padding):
  context tower: the masked mean of the embeddings of the last <= `context_len`
                 items, then a dense layer: c = normalise(W mean(E[h]) + b);
  label tower:   the next item's embedding: l = normalise(E[y]).
Similarity is cosine, s = c . l. A retrieval example is a row
[context_len + 1] int32: the context items right-padded with 0, then the label
(label 0 marks a padding row: it costs nothing and is nobody's negative).

Losses, per example over a batch of B rows with S = C L^T [B, B] (cosine,
times `logit_scale` inside the softmaxes):
  batch_softmax:  -log softmax(S_i)_i, the other rows' labels as negatives:
                  for a federated client they are the user's own items, the
                  failure the paper studies;
  global_softmax: -log softmax(c_i E_n^T)_{y_i} over every item (E_n the
                  normalised table);
  hinge:          max(0, 0.9 - S_ii)^2, positives only (batch-insensitive).
Spreadout regularisers, each lambda x the Frobenius norm of the off-diagonal
similarities (the reference code's definition), added once per batch:
  context: C C^T;  label: L L^T;  cross: S;  table (the paper's "global"
  spreadout; `global` is a Python keyword, so no config field can carry
  that name): E_n E_n^T over the whole item table, computed as sqrt(||E_n^T E_n||_F^2 - (V - 1)) in O(V d^2)
  (rows are unit vectors, so the diagonal holds V - 1 ones).
The global spreadout needs no data, so it can also be the server's loss f_c
of mixed FL (federated/algorithms.py), computed at the server instead of on
every client (`global_spreadout`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from infra import ranking
from infra.errors import ConfigError

LOSSES = ("batch_softmax", "global_softmax", "hinge")
SPREADOUTS = ("context", "label", "cross", "table")
HINGE_MARGIN = 0.9


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  vocab: int  # items + 1 (0 = padding)
  embed_dim: int = 32
  context_len: int = 10
  loss: str = "batch_softmax"
  logit_scale: float = 1.0
  spreadout: tuple[tuple[str, float], ...] = ()  # (name, lambda) pairs

  @classmethod
  def from_config(cls, retrieval: ml_collections.ConfigDict, vocab: int
                  ) -> "DualEncoderConfig":
    """`config.retrieval` (embed_dim, context_len, loss, logit_scale,
    spreadout.{context, label, cross, table}), checked field by field."""
    if retrieval.loss not in LOSSES:
      raise ConfigError(f"config.retrieval.loss={retrieval.loss!r} is not one of "
                        f"{LOSSES}")
    for field in ("embed_dim", "context_len"):
      if retrieval[field] < 1:
        raise ConfigError(f"config.retrieval.{field}={retrieval[field]} must be >= 1")
    if retrieval.logit_scale <= 0:
      raise ConfigError(f"config.retrieval.logit_scale={retrieval.logit_scale} "
                        "must be > 0")
    unknown = set(retrieval.spreadout) - set(SPREADOUTS)
    if unknown:
      raise ConfigError(f"config.retrieval.spreadout has unknown terms "
                        f"{sorted(unknown)}; known: {SPREADOUTS}")
    for name, weight in retrieval.spreadout.items():
      if weight < 0:
        raise ConfigError(f"config.retrieval.spreadout.{name}={weight} must be >= 0")
    return cls(vocab=vocab, embed_dim=retrieval.embed_dim,
               context_len=retrieval.context_len, loss=retrieval.loss,
               logit_scale=float(retrieval.logit_scale),
               spreadout=tuple((k, float(v)) for k, v in
                               sorted(retrieval.spreadout.items()) if v))


def normalise(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (a zero row stays zero)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


class DualEncoder(nn.Module):
  config: DualEncoderConfig

  def setup(self):
    cfg = self.config
    self.item_embed = nn.Embed(
        cfg.vocab, cfg.embed_dim, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")))
    self.context_dense = nn.Dense(
        cfg.embed_dim,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "embed_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               ("embed_out",)))

  def context(self, items: jax.Array) -> jax.Array:
    """items [b, >= 1] right-padded with 0 -> [b, d] unit context embeddings
    (the last `context_len` real items of each row)."""
    items = _last_items(items, self.config.context_len)
    real = (items > 0).astype(jnp.float32)[..., None]
    mean = jnp.sum(self.item_embed(items) * real, 1) / jnp.maximum(real.sum(1), 1.0)
    return normalise(self.context_dense(mean))

  def label(self, items: jax.Array) -> jax.Array:
    """items [b] -> [b, d] unit label embeddings."""
    return normalise(self.item_embed(items))

  def table(self) -> jax.Array:
    """[vocab, d] every item's unit embedding (row 0, padding, included)."""
    return normalise(self.item_embed.embedding)

  def __call__(self, examples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """examples [b, context_len + 1] -> (context [b, d], label [b, d])."""
    return self.context(examples[:, :-1]), self.label(examples[:, -1])


def _last_items(items: jax.Array, count: int) -> jax.Array:
  """[b, count]: the last `count` real items of each right-padded row, right-padded."""
  width = items.shape[1]
  if width <= count:
    return jnp.pad(items, ((0, 0), (0, count - width)))
  lengths = jnp.sum(items > 0, 1)
  start = jnp.maximum(lengths - count, 0)
  index = start[:, None] + jnp.arange(count)[None, :]
  picked = jnp.take_along_axis(items, jnp.minimum(index, width - 1), 1)
  return jnp.where(index < lengths[:, None], picked, 0)


def off_diagonal_norm(similarities: jax.Array, valid: jax.Array) -> jax.Array:
  """Frobenius norm of the off-diagonal entries of [n, n] `similarities`
  among the `valid` ([n] bool) rows and columns."""
  pair = valid[:, None] & valid[None, :] & ~jnp.eye(valid.shape[0], dtype=bool)
  return jnp.sqrt(jnp.sum(jnp.where(pair, similarities, 0.0) ** 2) + 1e-12)


def global_spreadout(table: jax.Array) -> jax.Array:
  """Frobenius norm of the off-diagonal of E_n E_n^T over items 1.. ([vocab,
  d] unit rows, row 0 padding left out), in O(V d^2)."""
  items = table[1:]
  gram = items.T @ items  # [d, d]
  diagonal = jnp.sum(jnp.sum(items * items, -1) ** 2)
  return jnp.sqrt(jnp.maximum(jnp.sum(gram * gram) - diagonal, 0.0) + 1e-12)


def example_losses(cfg: DualEncoderConfig, context: jax.Array, label: jax.Array,
                   label_ids: jax.Array, table: jax.Array) -> jax.Array:
  """[b] per-example losses of `cfg.loss` plus the batch's spreadouts (added
  to every real row, so the mean over real rows carries them once); padding
  rows (label id 0) get 0.

  context, label: [b, d] unit embeddings; label_ids: [b]; table: [vocab, d]
  the unit item table (global softmax, global spreadout).
  """
  valid = label_ids > 0
  sims = context @ label.T  # [b, b]
  if cfg.loss == "batch_softmax":
    logits = jnp.where(valid[None, :], cfg.logit_scale * sims, -jnp.inf)
    losses = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
  elif cfg.loss == "global_softmax":
    logits = (cfg.logit_scale * context @ table.T).at[:, 0].set(-jnp.inf)
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                                  label_ids[:, None], 1)[:, 0]
  elif cfg.loss == "hinge":
    losses = jnp.maximum(HINGE_MARGIN - jnp.diagonal(sims), 0.0) ** 2
  else:
    raise ConfigError(f"config.retrieval.loss={cfg.loss!r} is not one of {LOSSES}")
  penalty = 0.0
  for name, weight in cfg.spreadout:
    if name == "context":
      penalty += weight * off_diagonal_norm(context @ context.T, valid)
    elif name == "label":
      penalty += weight * off_diagonal_norm(label @ label.T, valid)
    elif name == "cross":
      penalty += weight * off_diagonal_norm(sims, valid)
    elif name == "table":
      penalty += weight * global_spreadout(table)
  return jnp.where(valid, losses + penalty, 0.0)


def make_example_loss(model: DualEncoder):
  """example_loss(params, examples [b, context_len + 1], rng) -> [b] (the
  federated round's protocol)."""

  def example_loss(params, examples, rng):
    del rng  # the model is deterministic
    context, label = model.apply({"params": params}, examples)
    table = model.apply({"params": params}, method=model.table)
    return example_losses(model.config, context, label, examples[:, -1], table)

  return example_loss


def make_rank_fn(model: DualEncoder):
  """jitted (params, inputs [b, len], lengths [b], targets [b], excluded [b,
  vocab]) -> [b] rank of each target among every item by cosine to the
  context of the last `context_len` inputs (Global Recall@K's ranks)."""

  @jax.jit
  def rank_fn(params, inputs, lengths, targets, excluded):
    del lengths  # the context reads the right-padded inputs itself
    context = model.apply({"params": params}, inputs, method=model.context)
    scores = context @ model.apply({"params": params}, method=model.table).T
    return ranking.target_ranks(scores, targets, excluded | _padding(scores))

  return rank_fn


def _padding(scores: jax.Array) -> jax.Array:
  return jnp.zeros(scores.shape, bool).at[:, 0].set(True)


def batch_recall(context: np.ndarray, label: np.ndarray, k: int) -> float:
  """Batch Recall@K: the share of rows whose own label is among the k most
  similar of the batch's labels (context, label: [b, d]; ties count against)."""
  sims = np.asarray(context) @ np.asarray(label).T
  own = np.diagonal(sims)[:, None]
  above = np.sum(sims > own, 1) + np.sum((sims == own), 1) - 1
  return float(np.mean(above < k))


def context_examples_by_user(items_of_user, num_users: int, context_len: int
                             ) -> tuple[np.ndarray, np.ndarray]:
  """Every (context, next item) pair of every user: rows [n, context_len + 1]
  (the up to `context_len` items before position t, right-padded, then item
  t, for t >= 1), and the user of each row [n]."""
  rows, users = [], []
  for user in range(num_users):
    items = items_of_user(user)
    for t in range(1, len(items)):
      context = items[max(0, t - context_len):t]
      row = np.zeros(context_len + 1, np.int32)
      row[:len(context)] = context
      row[-1] = items[t]
      rows.append(row)
      users.append(user)
  if not rows:
    return np.zeros((0, context_len + 1), np.int32), np.zeros((0,), np.int32)
  return np.stack(rows), np.asarray(users, np.int32)
