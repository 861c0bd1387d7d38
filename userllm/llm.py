"""A Gemma-style decoder-only LM with a KV cache, soft prompts and gated
cross-attention to user tokens.

The architecture and the parameter tree are Gemma v1's (RMSNorm with `1 + scale`,
RoPE on split halves, multi-query / grouped-query attention, gated GeLU MLP,
input embeddings scaled by sqrt(width) and tied with the output layer), so an
official Gemma Flax checkpoint maps onto it by renaming alone
(`userllm/gemma_loader.py`). Every parameter carries logical axis names.

One forward function serves training, scoring and decoding:

    logits, cache = model.apply({"params": p}, tokens, token_mask,
                                prefix=..., user_tokens=..., cache=...)

- `prefix` [batch, p, embed]: soft-prompt embeddings put before the tokens
  (User-LLM's soft-prompt integration); p = 0 is the plain LM.
- `user_tokens` [batch, u, embed]: what the gated cross-attention blocks (one
  after every `cross_attention_every` layers) attend to. Their tanh gates start at
  zero, so a fresh block leaves the LM's outputs unchanged.
- `task_ids` [batch]: the example's task, for adapters whose routers read it
  (`userllm/adapters.py`: LoRA, MoLoRA, MoDE on chosen projections).
- `cache`: from `init_cache`; the chunk is written at the cache's end and attends
  to everything before it. Without a cache the chunk attends to itself only.
  Padding (mask False) is never attended to; RoPE positions count real tokens
  only, so left-padded prompts decode exactly like unpadded ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from userllm import adapters

_MASKED = -2.3819763e38  # Gemma's K_MASK: large negative, finite, no NaN rows
VOCAB_MULTIPLE = 128  # embedding rows padded so `vocab` shards evenly


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int  # tokenizer pieces; the table is padded to VOCAB_MULTIPLE
  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 1  # 1: multi-query (Gemma 2B); = num_heads: multi-head
  head_dim: int = 32
  mlp_dim: int = 512
  rope_max_wavelength: int = 10_000
  cross_attention_every: int = 0  # k > 0: a gated cross-attention block after every k layers
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()  # LoRA / MoLoRA / MoDE
  dtype: str = "float32"  # activations; "bfloat16" on TPU

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  def validate(self) -> "LLMConfig":
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"llm.num_heads={self.num_heads} must be a multiple of "
                       f"llm.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"llm.head_dim={self.head_dim} must be even (RoPE)")
    self.adapter.validate()
    return self

  def cross_attention_after(self) -> tuple[int, ...]:
    """Indices of the layers followed by a cross-attention block."""
    k = self.cross_attention_every
    return tuple(i for i in range(self.num_layers) if k and (i + 1) % k == 0)


def _param(module: nn.Module, name: str, shape, axes, init=None):
  init = init or nn.initializers.normal(stddev=0.02)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.zeros)
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
    normed = x * jax.lax.rsqrt(variance + 1e-6).astype(x.dtype)
    return normed * (1 + scale).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: int) -> jax.Array:
  """x: [batch, len, heads, head_dim]; positions: [batch, len] -> same as x."""
  head_dim = x.shape[-1]
  fraction = 2 * jnp.arange(head_dim // 2) / head_dim
  angles = positions[..., None, None] / (max_wavelength ** fraction)
  sin, cos = jnp.sin(angles).astype(x.dtype), jnp.cos(angles).astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin,
                          second * cos + first * sin], -1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
  """Grouped-query attention.

  q: [batch, t, heads, d] (already scaled); k, v: [batch, s, kv_heads, d];
  allowed: [batch, t, s] bool -> [batch, t, heads, d].
  """
  b, t, h, d = q.shape
  groups = k.shape[2]
  q = q.reshape(b, t, groups, h // groups, d)
  logits = jnp.einsum("btkgd,bskd->btkgs", q, k)
  logits = jnp.where(allowed[:, :, None, None, :], logits, _MASKED)
  probs = jax.nn.softmax(logits.astype(jnp.float32), -1).astype(v.dtype)
  return jnp.einsum("btkgs,bskd->btkgd", probs, v).reshape(b, t, h, d)


def adapter_delta(cfg: LLMConfig, target: str, x, in_axes, out_shape, out_axes,
                  task_ids):
  """The adapter update of projection `target` (adapters.TARGETS), or 0 when
  the config puts none there. Call inside a compact module: the adapter is
  its submodule `<target>_adapter`."""
  if not cfg.adapter.enabled or target not in cfg.adapter.targets:
    return 0
  return adapters.Adapter(cfg.adapter, in_axes, out_shape, out_axes,
                          name=f"{target}{adapters.SUFFIX}")(x, task_ids)


class Attention(nn.Module):
  """Gemma's attention: q_einsum [heads, embed, d], kv_einsum [2, kv, embed, d],
  attn_vec_einsum [heads, d, embed]."""
  config: LLMConfig

  @nn.compact
  def __call__(self, x, positions, allowed, layer_cache, end, task_ids=None):
    cfg = self.config
    dtype = x.dtype
    wq = _param(self, "q_einsum", (cfg.num_heads, cfg.embed_dim, cfg.head_dim),
                ("heads", "embed", "kv")).astype(dtype)
    wkv = _param(self, "kv_einsum",
                 (2, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim),
                 (None, "kv_heads", "embed", "kv")).astype(dtype)
    wo = _param(self, "attn_vec_einsum",
                (cfg.num_heads, cfg.head_dim, cfg.embed_dim),
                ("heads", "kv", "embed")).astype(dtype)
    adapt = lambda target, x, in_axes, shape, axes: adapter_delta(  # noqa: E731
        cfg, target, x, in_axes, shape, axes, task_ids)
    heads, kv_heads = (cfg.num_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)
    q = jnp.einsum("btd,ndh->btnh", x, wq) + adapt("q", x, ("embed",), heads,
                                                   ("heads", "kv"))
    k, v = jnp.einsum("btd,cndh->cbtnh", x, wkv)
    k = k + adapt("k", x, ("embed",), kv_heads, ("kv_heads", "kv"))
    v = v + adapt("v", x, ("embed",), kv_heads, ("kv_heads", "kv"))
    q = apply_rope(q, positions, cfg.rope_max_wavelength) * cfg.head_dim ** -0.5
    k = apply_rope(k, positions, cfg.rope_max_wavelength)
    if layer_cache is not None:  # write this chunk at the cache's end
      k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(
          layer_cache["k"].dtype), (0, end, 0, 0)).astype(dtype)
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(
          layer_cache["v"].dtype), (0, end, 0, 0)).astype(dtype)
      layer_cache = {"k": k, "v": v}
    attended = attend(q, k, v, allowed)
    out = jnp.einsum("btnh,nhd->btd", attended, wo) + adapt(
        "out", attended, ("heads", "kv"), (cfg.embed_dim,), ("embed",))
    return out, layer_cache


class FeedForward(nn.Module):
  """Gated GeLU: gating_einsum [2, embed, mlp], linear [mlp, embed]."""
  config: LLMConfig
  adapted: bool = True  # False: never adapters (the cross-attention blocks' MLP)

  @nn.compact
  def __call__(self, x, task_ids=None):
    cfg = self.config
    adapt = lambda target, x, in_axes, shape, axes: adapter_delta(  # noqa: E731
        cfg, target, x, in_axes, shape, axes, task_ids) if self.adapted else 0
    gating = _param(self, "gating_einsum", (2, cfg.embed_dim, cfg.mlp_dim),
                    (None, "embed", "mlp")).astype(x.dtype)
    linear = _param(self, "linear", (cfg.mlp_dim, cfg.embed_dim),
                    ("mlp", "embed")).astype(x.dtype)
    gate, up = jnp.einsum("btd,cdf->cbtf", x, gating)
    gate = gate + adapt("gate", x, ("embed",), (cfg.mlp_dim,), ("mlp",))
    up = up + adapt("up", x, ("embed",), (cfg.mlp_dim,), ("mlp",))
    hidden = nn.gelu(gate) * up
    return jnp.einsum("btf,fd->btd", hidden, linear) + adapt(
        "down", hidden, ("mlp",), (cfg.embed_dim,), ("embed",))


class Block(nn.Module):
  config: LLMConfig

  @nn.compact
  def __call__(self, x, positions, allowed, layer_cache, end, task_ids=None):
    attended, layer_cache = Attention(self.config, name="attn")(
        RMSNorm(name="pre_attention_norm")(x), positions, allowed, layer_cache, end,
        task_ids)
    x = x + attended
    x = x + FeedForward(self.config, name="mlp")(RMSNorm(name="pre_ffw_norm")(x),
                                                 task_ids)
    return x, layer_cache


class GatedCrossAttention(nn.Module):
  """Flamingo-style: x + tanh(g_attn) * CrossAttn(x, user) then
  x + tanh(g_mlp) * MLP(x); both gates start at 0 (the block is then a no-op)."""
  config: LLMConfig

  @nn.compact
  def __call__(self, x, user_tokens, user_mask):
    """x: [b, t, embed]; user_tokens: [b, u, embed]; user_mask: [b, u] bool."""
    cfg = self.config
    dtype = x.dtype
    wq = _param(self, "q_einsum", (cfg.num_heads, cfg.embed_dim, cfg.head_dim),
                ("heads", "embed", "kv")).astype(dtype)
    wkv = _param(self, "kv_einsum", (2, cfg.num_heads, cfg.embed_dim, cfg.head_dim),
                 (None, "heads", "embed", "kv")).astype(dtype)
    wo = _param(self, "attn_vec_einsum", (cfg.num_heads, cfg.head_dim, cfg.embed_dim),
                ("heads", "kv", "embed")).astype(dtype)
    attn_gate = _param(self, "attn_gate", (), (), nn.initializers.zeros)
    mlp_gate = _param(self, "mlp_gate", (), (), nn.initializers.zeros)
    user = user_tokens.astype(dtype)
    q = jnp.einsum("btd,ndh->btnh", RMSNorm(name="pre_attention_norm")(x), wq)
    k, v = jnp.einsum("bud,cndh->cbunh", user, wkv)
    allowed = jnp.broadcast_to(user_mask[:, None, :],
                               (x.shape[0], x.shape[1], user.shape[1]))
    attended = attend(q * cfg.head_dim ** -0.5, k, v, allowed)
    x = x + jnp.tanh(attn_gate).astype(dtype) * jnp.einsum("btnh,nhd->btd",
                                                            attended, wo)
    mlp = FeedForward(cfg, adapted=False, name="mlp")(RMSNorm(name="pre_ffw_norm")(x))
    return x + jnp.tanh(mlp_gate).astype(dtype) * mlp


def init_cache(config: LLMConfig, batch: int, size: int,
               dtype=jnp.float32) -> dict:
  """An empty KV cache of `size` slots.

  Returns {"layers": [{"k", "v": [batch, size, kv_heads, head_dim]}] * layers,
  "mask": [batch, size] bool (slot holds a real token), "count": [batch] int32
  (real tokens so far: the next RoPE position), "end": [] int32 (next slot)}.
  """
  shape = (batch, size, config.num_kv_heads, config.head_dim)
  return {"layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                     for _ in range(config.num_layers)],
          "mask": jnp.zeros((batch, size), bool),
          "count": jnp.zeros((batch,), jnp.int32),
          "end": jnp.zeros((), jnp.int32)}


class DecoderLM(nn.Module):
  config: LLMConfig

  def setup(self):
    cfg = self.config.validate()
    self.embedder = Embedder(cfg, name="embedder")
    self.layers = [Block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.cross = {i: GatedCrossAttention(cfg, name=f"cross_attention_{i}")
                  for i in cfg.cross_attention_after()}
    self.final_norm = RMSNorm(name="final_norm")

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens: [b, t] -> [b, t, embed], scaled by sqrt(embed) as in Gemma."""
    return self.embedder.encode(tokens).astype(jnp.dtype(self.config.dtype))

  def __call__(self, tokens: jax.Array, token_mask: jax.Array, *,
               prefix: jax.Array | None = None, prefix_mask: jax.Array | None = None,
               user_tokens: jax.Array | None = None,
               user_mask: jax.Array | None = None, cache: dict | None = None,
               task_ids: jax.Array | None = None):
    """tokens, token_mask: [b, t]; prefix: [b, p, embed], prefix_mask [b, p];
    task_ids: [b] int, read by task-conditioned adapter routers.

    Returns (logits [b, p + t, vocab_size] float32, the updated cache or None).
    """
    x = self.embed(tokens)
    mask = token_mask.astype(bool)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], 1)
      mask = jnp.concatenate([prefix_mask.astype(bool), mask], 1)
    if self.cross and user_tokens is None:
      raise ValueError("this LM has cross-attention blocks: pass user_tokens")
    positions, allowed, end, new_cache = _attention_layout(mask, cache)
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x, layer_cache = layer(x, positions, allowed, layer_cache, end, task_ids)
      if cache is not None:
        new_cache["layers"].append(layer_cache)
      if i in self.cross:
        if user_mask is None:
          user_mask = jnp.ones(user_tokens.shape[:2], bool)
        x = self.cross[i](x, user_tokens, user_mask)
    logits = self.embedder.decode(self.final_norm(x))
    return logits[..., :self.config.vocab_size].astype(jnp.float32), new_cache


class Embedder(nn.Module):
  config: LLMConfig

  def setup(self):
    cfg = self.config
    self.input_embedding = _param(self, "input_embedding",
                                  (cfg.padded_vocab, cfg.embed_dim),
                                  ("vocab", "embed"))

  def encode(self, tokens):
    return self.input_embedding[tokens] * jnp.sqrt(self.config.embed_dim)

  def decode(self, x):
    return jnp.einsum("btd,vd->btv", x, self.input_embedding.astype(x.dtype))


def _attention_layout(mask: jax.Array, cache: dict | None):
  """RoPE positions, the allowed-attention mask and where the chunk goes.

  mask: [b, t] real tokens of this chunk. Without a cache the chunk attends to
  itself; with one it is written at slots end..end+t-1 and attends to every
  earlier real slot. Returns (positions [b, t], allowed [b, t, s], end, cache
  skeleton with the new mask/count/end and an empty "layers" list, or None).
  """
  t = mask.shape[1]
  before = 0 if cache is None else cache["count"][:, None]
  positions = before + jnp.cumsum(mask, 1) - 1
  if cache is None:
    slots = jnp.arange(t)
    allowed = (slots[None, :] <= slots[:, None])[None] & mask[:, None, :]
    return positions, allowed, 0, None
  end = cache["end"]
  key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, end))
  query_slots = end + jnp.arange(t)
  key_slots = jnp.arange(key_mask.shape[1])
  allowed = (key_slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]
  skeleton = {"layers": [], "mask": key_mask,
              "count": cache["count"] + mask.sum(1).astype(jnp.int32),
              "end": end + t}
  return positions, allowed, end, skeleton
