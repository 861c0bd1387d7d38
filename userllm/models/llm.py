"""A Gemma-style decoder-only LM with a KV cache, soft prompts and gated
cross-attention to user tokens.

The architecture and the parameter tree are Gemma's (RMSNorm with `1 + scale`,
RoPE on split halves, multi-query / grouped-query attention, gated GeLU MLP,
input embeddings scaled by sqrt(width) and tied with the output layer), so an
official Gemma Flax checkpoint maps onto it by renaming alone
(`userllm/models/gemma_loader.py`). Every parameter carries logical axis names.
Gemma 2 and 3 are the same module with `LLMConfig` switches (each released
variant's values are data in `gemma_variants`):
- Gemma 2: norms after attention and MLP too (`post_norms`), tanh soft-capping
  of attention logits (50) and final logits (30), sliding-window attention
  (4,096) on every other layer (`global_every=2`).
- Gemma 3: post-norms, RMSNorm of queries and keys over head_dim (`qk_norm`),
  no soft-capping, five sliding-window layers to one global (`global_every=6`),
  and RoPE with base 10k on local layers but 1M on global ones, there with
  positions divided by a scale factor (8 on 4B and up).
- The query scale (`query_scale`) is head_dim ** -0.5 except on Gemma 2 27B
  and Gemma 3 27B, which take (embed_dim / num_heads) ** -0.5.

One forward function serves training, scoring and decoding:

    logits, cache = model.apply({"params": p}, tokens, token_mask,
                                prefix=..., user_tokens=..., cache=...)

- `prefix` [batch, p, embed]: soft-prompt embeddings put before the tokens
  (User-LLM's soft-prompt integration); p = 0 is the plain LM.
- `user_tokens` [batch, u, embed]: what the gated cross-attention blocks (one
  after every `cross_attention_every` layers) attend to. Their tanh gates start at
  `cross_attention_gate_init`, by default zero: a fresh block then leaves the LM's
  outputs unchanged.
- `task_ids` [batch]: the example's task, for adapters whose routers read it
  (`userllm/models/adapters.py`: LoRA, MoLoRA, MoDE on chosen projections).
- `cache`: from `init_cache`; the chunk is written at the cache's end and attends
  to everything before it. Without a cache the chunk attends to itself only.
  Padding (mask False) is never attended to; RoPE positions count real tokens
  only, so left-padded prompts decode exactly like unpadded ones.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from userllm.models import adapters

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
  rope_max_wavelength: int = 10_000  # RoPE base (of local layers, when they differ)
  # Gemma 2 / 3 (the defaults are Gemma v1's; see gemma_variants):
  post_norms: bool = False  # RMSNorm after attention and after the MLP as well
  qk_norm: bool = False  # RMSNorm of queries and keys over head_dim
  query_scale: float = 0.0  # queries x this; 0 = head_dim ** -0.5
  attn_logit_softcap: float = 0.0  # cap * tanh(logits / cap); 0 = none
  final_logit_softcap: float = 0.0
  sliding_window: int = 0  # local layers attend to |i - j| < window; 0 = none
  global_every: int = 1  # layer i is global iff (i + 1) % global_every == 0
  rope_global_wavelength: int = 0  # RoPE base of global layers; 0 = rope_max_wavelength
  rope_global_scale: float = 1.0  # global layers' positions are divided by it
  cross_attention_every: int = 0  # k > 0: a gated cross-attention block after every k layers
  cross_attention_gate_init: float = 0.0  # tanh of its gates at init (0: a no-op block)
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()  # LoRA / MoLoRA / MoDE
  dtype: str = "float32"  # activations; "bfloat16" on TPU
  # recompute each decoder layer's activations in the backward pass
  # (jax.checkpoint): a step then keeps one layer's activations alive rather
  # than every layer's, for about a third more FLOPs. Same parameters, same
  # values; what lets batch-64 RL steps of 7B models fit a TPU chip
  remat: bool = False

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  def validate(self) -> "LLMConfig":
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"llm.num_heads={self.num_heads} must be a multiple of "
                       f"llm.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"llm.head_dim={self.head_dim} must be even (RoPE)")
    if self.global_every < 1 or self.sliding_window < 0:
      raise ValueError(f"llm.global_every={self.global_every} must be >= 1 and "
                       f"llm.sliding_window={self.sliding_window} >= 0")
    if not 0.0 <= self.cross_attention_gate_init < 1.0:
      raise ValueError("llm.cross_attention_gate_init="
                       f"{self.cross_attention_gate_init} must be in [0, 1)")
    if self.rope_global_scale < 1.0:
      raise ValueError(f"llm.rope_global_scale={self.rope_global_scale} must be >= 1")
    self.adapter.validate()
    return self

  def is_global(self, layer: int) -> bool:
    """Whether `layer` attends to the whole context (else its sliding window)."""
    return not self.sliding_window or (layer + 1) % self.global_every == 0

  def rope(self, layer: int) -> tuple[int, float]:
    """(RoPE base wavelength, position scale factor) of `layer`."""
    if self.is_global(layer) and self.rope_global_wavelength:
      return self.rope_global_wavelength, self.rope_global_scale
    return self.rope_max_wavelength, 1.0

  @property
  def query_scalar(self) -> float:
    return self.query_scale or self.head_dim ** -0.5

  def cross_attention_after(self) -> tuple[int, ...]:
    """Indices of the layers followed by a cross-attention block."""
    k = self.cross_attention_every
    return tuple(i for i in range(self.num_layers) if k and (i + 1) % k == 0)


def forward_flops(cfg: LLMConfig, tokens: int, user_tokens: int = 0) -> float:
  """Matmul FLOPs (2 per multiply-add) of one forward pass over `tokens`
  positions (soft-prompt slots included), with `user_tokens` for the
  cross-attention blocks. Attention scores are computed over the full
  tokens x tokens square (the causal half is masked, not skipped), as here."""
  d, h, kv, hd, f = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim, cfg.mlp_dim)
  mlp = 2 * 3 * d * f  # gating (2 x d x f) and linear (f x d) per token
  self_attn_proj = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d)
  scores = 2 * 2 * tokens * tokens * h * hd  # QK^T and PV
  layer = tokens * (self_attn_proj + mlp) + scores
  cross = (tokens * (2 * (d * h * hd + h * hd * d) + mlp)
           + user_tokens * 2 * 2 * d * h * hd + 2 * 2 * tokens * user_tokens * h * hd)
  logits = 2 * tokens * d * cfg.padded_vocab
  return float(cfg.num_layers * layer + len(cfg.cross_attention_after()) * cross
               + logits)


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


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: int,
               scale: float = 1.0) -> jax.Array:
  """x: [batch, len, heads, head_dim]; positions: [batch, len] (divided by
  `scale`, Gemma 3's long-context factor) -> same as x."""
  head_dim = x.shape[-1]
  fraction = 2 * jnp.arange(head_dim // 2) / head_dim
  angles = positions[..., None, None] / (max_wavelength ** fraction) / scale
  sin, cos = jnp.sin(angles).astype(x.dtype), jnp.cos(angles).astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin,
                          second * cos + first * sin], -1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
           softcap: float = 0.0) -> jax.Array:
  """Grouped-query attention.

  q: [batch, t, heads, d] (already scaled); k, v: [batch, s, kv_heads, d];
  allowed: [batch, t, s] bool -> [batch, t, heads, d]. `softcap` > 0 squashes
  the logits to cap * tanh(logits / cap) (Gemma 2).
  """
  b, t, h, d = q.shape
  groups = k.shape[2]
  q = q.reshape(b, t, groups, h // groups, d)
  logits = jnp.einsum("btkgd,bskd->btkgs", q, k)
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
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
  attn_vec_einsum [heads, d, embed]; with qk_norm also `_query_norm` and
  `_key_norm` (Gemma 3's names)."""
  config: LLMConfig
  layer: int = 0  # which layer: local or global, and its RoPE

  @nn.compact
  def __call__(self, x, positions, allowed, layer_cache, end, task_ids=None,
               key_positions=None):
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
    if cfg.qk_norm:
      q, k = RMSNorm(name="_query_norm")(q), RMSNorm(name="_key_norm")(k)
    wavelength, scale = cfg.rope(self.layer)
    q = apply_rope(q, positions, wavelength, scale) * cfg.query_scalar
    k = apply_rope(k, positions, wavelength, scale)
    if not cfg.is_global(self.layer):  # Gemma's sliding window, in positions
      key_positions = positions if key_positions is None else key_positions
      distance = positions[:, :, None] - key_positions[:, None, :]
      allowed = allowed & (jnp.abs(distance) < cfg.sliding_window)
    if layer_cache is not None:  # write this chunk at the cache's end
      k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(
          layer_cache["k"].dtype), (0, end, 0, 0)).astype(dtype)
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(
          layer_cache["v"].dtype), (0, end, 0, 0)).astype(dtype)
      layer_cache = {"k": k, "v": v}
    attended = attend(q, k, v, allowed, cfg.attn_logit_softcap)
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
  layer: int = 0

  @nn.compact
  def __call__(self, x, positions, allowed, layer_cache, end, task_ids=None,
               key_positions=None):
    attended, layer_cache = Attention(self.config, self.layer, name="attn")(
        RMSNorm(name="pre_attention_norm")(x), positions, allowed, layer_cache, end,
        task_ids, key_positions)
    if self.config.post_norms:
      attended = RMSNorm(name="post_attention_norm")(attended)
    x = x + attended
    mlp = FeedForward(self.config, name="mlp")(RMSNorm(name="pre_ffw_norm")(x),
                                               task_ids)
    if self.config.post_norms:
      mlp = RMSNorm(name="post_ffw_norm")(mlp)
    return x + mlp, layer_cache


class GatedCrossAttention(nn.Module):
  """Flamingo-style: x + tanh(g_attn) * CrossAttn(x, user) then
  x + tanh(g_mlp) * MLP(x); both gates start at tanh = cross_attention_gate_init
  (0 by default: the block is then a no-op)."""
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
    gate = nn.initializers.constant(math.atanh(cfg.cross_attention_gate_init))
    attn_gate = _param(self, "attn_gate", (), (), gate)
    mlp_gate = _param(self, "mlp_gate", (), (), gate)
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
  "mask": [batch, size] bool (slot holds a real token), "positions": [batch,
  size] int32 (each slot's RoPE position, for sliding windows), "count":
  [batch] int32 (real tokens so far: the next RoPE position), "end": [] int32
  (next slot)}.
  """
  shape = (batch, size, config.num_kv_heads, config.head_dim)
  return {"layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                     for _ in range(config.num_layers)],
          "mask": jnp.zeros((batch, size), bool),
          "positions": jnp.zeros((batch, size), jnp.int32),
          "count": jnp.zeros((batch,), jnp.int32),
          "end": jnp.zeros((), jnp.int32)}


class DecoderLM(nn.Module):
  config: LLMConfig

  def setup(self):
    cfg = self.config.validate()
    self.embedder = Embedder(cfg, name="embedder")
    block = nn.remat(Block) if cfg.remat else Block
    self.layers = [block(cfg, i, name=f"layer_{i}") for i in range(cfg.num_layers)]
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
               task_ids: jax.Array | None = None, return_hidden: bool = False):
    """tokens, token_mask: [b, t]; prefix: [b, p, embed], prefix_mask [b, p];
    task_ids: [b] int, read by task-conditioned adapter routers.

    Returns (logits [b, p + t, vocab_size] float32, the updated cache or None);
    with `return_hidden`, the final-normed states [b, p + t, embed] instead of
    the logits (what a value head reads).
    """
    x = self.embed(tokens)
    mask = token_mask.astype(bool)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], 1)
      mask = jnp.concatenate([prefix_mask.astype(bool), mask], 1)
    if self.cross and user_tokens is None:
      raise ValueError("this LM has cross-attention blocks: pass user_tokens")
    positions, allowed, end, new_cache = _attention_layout(mask, cache)
    key_positions = None if cache is None else new_cache["positions"]
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x, layer_cache = layer(x, positions, allowed, layer_cache, end, task_ids,
                             key_positions)
      if cache is not None:
        new_cache["layers"].append(layer_cache)
      if i in self.cross:
        if user_mask is None:
          user_mask = jnp.ones(user_tokens.shape[:2], bool)
        x = self.cross[i](x, user_tokens, user_mask)
    if return_hidden:
      return self.final_norm(x), new_cache
    return self.logits_of(self.final_norm(x)), new_cache

  def run_layers(self, x: jax.Array, token_mask: jax.Array, first: int,
                 stop: int, task_ids: jax.Array | None = None) -> jax.Array:
    """Decoder layers first..stop-1 over x [b, t, embed] with no cache and no
    prefix: one side of a split forward (FELLRec's flexible storage,
    federated/llm_split.py). The attention layout follows from token_mask
    [b, t] alone, so each side recomputes it from the mask it is sent."""
    if any(first <= i < stop for i in self.cross):
      raise ValueError("a split forward runs no cross-attention blocks")
    positions, allowed, end, _ = _attention_layout(token_mask.astype(bool), None)
    for layer in self.layers[first:stop]:
      x, _ = layer(x, positions, allowed, None, end, task_ids)
    return x

  def head(self, x: jax.Array) -> jax.Array:
    """The last layer's states [..., embed] -> logits [..., vocab_size]."""
    return self.logits_of(self.final_norm(x))

  def logits_of(self, hidden: jax.Array) -> jax.Array:
    """Final-normed states [..., embed] (`return_hidden`) -> logits [...,
    vocab_size] float32: what a caller that needs some positions' logits
    only (RL's summary tokens of a long prompt) applies to those alone."""
    logits = self.embedder.decode(hidden)
    logits = logits[..., :self.config.vocab_size].astype(jnp.float32)
    cap = self.config.final_logit_softcap
    if cap:
      logits = jnp.tanh(logits / cap) * cap
    return logits


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
    return jnp.einsum("...d,vd->...v", x, self.input_embedding.astype(x.dtype))


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
              "positions": jax.lax.dynamic_update_slice(
                  cache["positions"], positions.astype(jnp.int32), (0, end)),
              "count": cache["count"] + mask.sum(1).astype(jnp.int32),
              "end": end + t}
  return positions, allowed, end, skeleton
