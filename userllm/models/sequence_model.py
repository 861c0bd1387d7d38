"""A causal transformer over a user's timeline: the next-item model and the
User-LLM user encoder.

Pre-LayerNorm blocks, learned positions, item embeddings tied with the output
layer. Every parameter carries logical axis names (see infra/mesh.py).
Inputs are right-padded with item 0; attention is causal and never reads padding.

`fusion` picks what an event is:
- "id": the item id alone (the next-item workflow);
- "early": item id, rating and genres embedded, concatenated and projected into
  one token per event before the transformer (User-LLM's early fusion);
- "late": each feature through its own transformer stack, the per-position
  outputs concatenated and projected after them (late fusion; 3x the compute).
With features, `next_event_loss` pretrains autoregressively on the next event's
item (tied softmax), genres (multi-label) and rating (5-way).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from data.timelines import PAD_ITEM

_init = nn.initializers.normal(stddev=0.02)


def _param(axes):
  return nn.with_logical_partitioning(_init, axes)


VOCAB_MULTIPLE = 128  # the embedding table is padded so 'vocab' shards evenly


@dataclasses.dataclass(frozen=True)
class SequenceModelConfig:
  vocab_size: int  # num_items + 1 (index 0 is padding)
  max_len: int
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int = 256
  dropout: float = 0.1
  fusion: str = "id"  # "id" | "early" | "late" (see the module docstring)
  num_genres: int = 0  # genre multi-hot width; needed by "early" / "late"

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int,
                  max_len: int, **overrides) -> "SequenceModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "max_len"}
    kwargs = {k: model[k] for k in fields if k in model}
    return cls(vocab_size=vocab_size, max_len=max_len, **{**kwargs, **overrides})

  def validate(self) -> "SequenceModelConfig":
    if self.fusion not in FUSIONS:
      raise ValueError(f"fusion={self.fusion!r} is not one of {FUSIONS}")
    if self.fusion != "id" and self.num_genres < 1:
      raise ValueError(f"fusion={self.fusion!r} needs num_genres >= 1")
    return self


FUSIONS = ("id", "early", "late")
NUM_RATINGS = 5  # ratings are rounded to 1..5; bucket 0 is padding


class CausalSelfAttention(nn.Module):
  config: SequenceModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """x: [batch, len, embed]; mask: [batch, 1, len, len] bool -> [batch, len, embed]."""
    cfg = self.config
    head_dim = cfg.embed_dim // cfg.num_heads
    project = lambda name: nn.DenseGeneral(  # noqa: E731
        (cfg.num_heads, head_dim), kernel_init=_param(("embed", "heads", "kv")),
        use_bias=False, name=name)(x)
    q, k, v = project("query"), project("key"), project("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = nn.Dropout(cfg.dropout)(jax.nn.softmax(logits, -1),
                                      deterministic=not train)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(cfg.embed_dim, axis=(-2, -1), use_bias=False,
                           kernel_init=_param(("heads", "kv", "embed")),
                           name="out")(attended)


class Block(nn.Module):
  config: SequenceModelConfig

  @nn.compact
  def __call__(self, x, mask, train: bool):
    cfg = self.config
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        name=name, scale_init=nn.with_logical_partitioning(nn.initializers.ones,
                                                           ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    dropout = nn.Dropout(cfg.dropout, deterministic=not train)
    x = x + dropout(CausalSelfAttention(cfg, name="attention")(
        norm("attention_norm")(x), mask, train))
    h = nn.Dense(cfg.mlp_dim, kernel_init=_param(("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                        ("mlp",)),
                 name="mlp_in")(norm("mlp_norm")(x))
    h = nn.Dense(cfg.embed_dim, kernel_init=_param(("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                        ("embed",)),
                 name="mlp_out")(nn.gelu(h))
    return x + dropout(h)


class ItemSequenceTransformer(nn.Module):
  """`encode` gives per-position user states, `item_logits` next-item scores."""
  config: SequenceModelConfig

  def setup(self):
    cfg = self.config.validate()
    padded_vocab = -(-cfg.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    self.item_embed = nn.Embed(padded_vocab, cfg.embed_dim,
                               embedding_init=_param(("vocab", "embed")))
    self.position_embed = self.param("position_embed", _param(("length", "embed")),
                                     (cfg.max_len, cfg.embed_dim))
    self.blocks = [Block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = _layer_norm()
    self.dropout = nn.Dropout(cfg.dropout)
    if cfg.fusion != "id":
      self.rating_embed = nn.Embed(NUM_RATINGS + 1, cfg.embed_dim,
                                   embedding_init=_param((None, "embed")))
      self.genre_embed = nn.Dense(cfg.embed_dim, use_bias=False,
                                  kernel_init=_param((None, "embed")))
      self.fuse = nn.Dense(cfg.embed_dim, kernel_init=_param((None, "embed")),
                           bias_init=nn.with_logical_partitioning(
                               nn.initializers.zeros, ("embed",)))
      self.genre_head = nn.Dense(cfg.num_genres, kernel_init=_param(("embed", None)))
      self.rating_head = nn.Dense(NUM_RATINGS, kernel_init=_param(("embed", None)))
    if cfg.fusion == "late":  # one more stack each for ratings and genres
      self.feature_blocks = {
          f: [Block(cfg, name=f"{f}_block_{i}") for i in range(cfg.num_layers)]
          for f in ("rating", "genre")}
      self.feature_norms = {f: _layer_norm(name=f"{f}_final_norm")
                            for f in ("rating", "genre")}

  def _stack(self, x, is_real, blocks, norm, train):
    """Positions + causal blocks over [b, len, embed] tokens; padding unread."""
    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None, None] & is_real[:, None, None, :]
    x = self.dropout(x + self.position_embed[None, :length], deterministic=not train)
    for block in blocks:
      x = block(x, mask, train)
    return norm(x)

  def encode(self, items: jax.Array, train: bool = False, *,
             ratings: jax.Array | None = None,
             genres: jax.Array | None = None) -> jax.Array:
    """items: [batch, len] int (0 = padding); with fusion also ratings [batch,
    len] int in 0..5 and genres [batch, len, num_genres] -> [batch, len, embed]."""
    is_real = items != PAD_ITEM
    item_x = self.item_embed(items)
    fusion = self.config.fusion
    if fusion == "id":
      return self._stack(item_x, is_real, self.blocks, self.final_norm, train)
    if ratings is None or genres is None:
      raise ValueError(f"fusion={fusion!r} needs ratings and genres")
    rating_x = self.rating_embed(ratings)
    genre_x = self.genre_embed(genres.astype(item_x.dtype))
    if fusion == "early":
      fused = self.fuse(jnp.concatenate([item_x, rating_x, genre_x], -1))
      return self._stack(fused, is_real, self.blocks, self.final_norm, train)
    streams = [self._stack(item_x, is_real, self.blocks, self.final_norm, train)]
    for name, x in (("rating", rating_x), ("genre", genre_x)):
      streams.append(self._stack(x, is_real, self.feature_blocks[name],
                                 self.feature_norms[name], train))
    return self.fuse(jnp.concatenate(streams, -1))

  # The id-only forward pass in three parts, for split storage
  # (federated/split.py): encode == final_states(run_blocks(embed_items(..))).
  def embed_items(self, items: jax.Array, train: bool = False):
    """items [b, len] -> (tokens [b, len, embed] with positions, attention
    mask [b, 1, len, len]): what the first block reads."""
    is_real = items != PAD_ITEM
    length = items.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None, None] & is_real[:, None, None, :]
    x = self.item_embed(items) + self.position_embed[None, :length]
    return self.dropout(x, deterministic=not train), mask

  def run_blocks(self, x: jax.Array, mask: jax.Array, start: int, stop: int,
                 train: bool = False) -> jax.Array:
    """Blocks start..stop-1 over x [b, len, embed]."""
    for block in self.blocks[start:stop]:
      x = block(x, mask, train)
    return x

  def final_states(self, x: jax.Array) -> jax.Array:
    """The final LayerNorm: the states `item_logits` reads."""
    return self.final_norm(x)

  def item_logits(self, states: jax.Array) -> jax.Array:
    """states: [..., embed] -> [..., vocab] scores; padding item at -inf."""
    logits = self.item_embed.attend(states)[..., :self.config.vocab_size]
    return logits.at[..., PAD_ITEM].set(-jnp.inf)

  def training_logits(self, states: jax.Array) -> jax.Array:
    """states: [..., embed] -> [..., padded vocab] scores for the losses: the
    same softmax as `item_logits`, with the padding item and the table's
    padding rows pushed to a large finite negative by one additive mask (exp()
    of them is 0, and a padded target's masked-out loss stays finite). No
    slice or rewrite of the [..., vocab] tensor: on CPU those passes and their
    gradients cost about 15% of a small model's federated round."""
    logits = self.item_embed.attend(states)
    ids = jnp.arange(logits.shape[-1])
    not_an_item = (ids == PAD_ITEM) | (ids >= self.config.vocab_size)
    return logits + jnp.where(not_an_item, jnp.finfo(logits.dtype).min / 2,
                              0).astype(logits.dtype)

  def feature_logits(self, states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """states: [..., embed] -> (genre logits [..., genres], rating logits [..., 5])."""
    return self.genre_head(states), self.rating_head(states)

  def __call__(self, items: jax.Array, train: bool = False) -> jax.Array:
    """items: [batch, len] -> next-item logits [batch, len, vocab]."""
    return self.item_logits(self.encode(items, train))

  def next_event_logits(self, items, ratings, genres, train: bool = False):
    """Fused events [batch, len] -> logits of the next event's item [..., padded
    vocab] (`training_logits`), genres [..., num_genres] and rating [..., 5]
    (also initialises every head)."""
    states = self.encode(items, train, ratings=ratings, genres=genres)
    return (self.training_logits(states), *self.feature_logits(states))


def _layer_norm(name=None):
  return nn.LayerNorm(
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _token_losses(model: ItemSequenceTransformer, params, windows: jax.Array,
                  rng: jax.Array, train: bool):
  """Per-position cross-entropy and correctness of every next item in `windows`.

  Returns (losses, correct, is_target), each [batch, len]; padded targets have
  is_target False.
  """
  inputs, targets = windows[:, :-1], windows[:, 1:]
  logits = model.apply({"params": params}, inputs, rngs={"dropout": rng},
                       method=lambda m, x: m.training_logits(m.encode(x, train)))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return losses, logits.argmax(-1) == targets, targets != PAD_ITEM


def next_item_loss(model: ItemSequenceTransformer, params, windows: jax.Array,
                   rng: jax.Array, train: bool = True):
  """Mean cross-entropy of every real next item in `windows` ([batch, len + 1])."""
  losses, correct, is_target = _token_losses(model, params, windows, rng, train)
  count = jnp.maximum(is_target.sum(), 1)
  loss = jnp.sum(losses * is_target) / count
  accuracy = jnp.sum(correct * is_target) / count
  return loss, {"accuracy": accuracy}


def next_item_example_losses(model: ItemSequenceTransformer, params,
                             windows: jax.Array, rng: jax.Array,
                             train: bool = True) -> jax.Array:
  """[batch] mean cross-entropy over each window's real next items (0 for a
  window without any, e.g. an all-padding row)."""
  losses, _, is_target = _token_losses(model, params, windows, rng, train)
  return jnp.sum(losses * is_target, 1) / jnp.maximum(is_target.sum(1), 1)


def rating_buckets(ratings: jax.Array, items: jax.Array) -> jax.Array:
  """Ratings rounded into 1..NUM_RATINGS; 0 where the item is padding."""
  buckets = jnp.clip(jnp.round(ratings), 1, NUM_RATINGS).astype(jnp.int32)
  return jnp.where(items == PAD_ITEM, 0, buckets)


def next_event_loss(model: ItemSequenceTransformer, params, events: dict,
                    rng: jax.Array, train: bool = True):
  """Autoregressive pretraining of a fused encoder: from events 0..t predict
  event t + 1's item (softmax over all items), genres (sigmoid per genre) and
  rating bucket (5-way softmax); the three mean losses are summed.

  events: {"items": [b, len + 1] int, "ratings": [b, len + 1] int buckets,
  "genres": [b, len + 1, num_genres]}.
  """
  inputs = {k: v[:, :-1] for k, v in events.items()}
  targets = {k: v[:, 1:] for k, v in events.items()}
  item_logits, genre_logits, rating_logits = model.apply(
      {"params": params}, inputs["items"], inputs["ratings"], inputs["genres"],
      train, method=model.next_event_logits, rngs={"dropout": rng})
  is_target = targets["items"] != PAD_ITEM
  count = jnp.maximum(is_target.sum(), 1)
  mean = lambda x: jnp.sum(x * is_target) / count  # noqa: E731
  item_loss = mean(optax.softmax_cross_entropy_with_integer_labels(
      item_logits, targets["items"]))
  genre_loss = mean(optax.sigmoid_binary_cross_entropy(
      genre_logits, targets["genres"].astype(genre_logits.dtype)).mean(-1))
  rating_loss = mean(optax.softmax_cross_entropy_with_integer_labels(
      rating_logits, jnp.maximum(targets["ratings"] - 1, 0)))
  accuracy = mean(item_logits.argmax(-1) == targets["items"])
  return item_loss + genre_loss + rating_loss, {
      "item_loss": item_loss, "genre_loss": genre_loss,
      "rating_loss": rating_loss, "accuracy": accuracy}
