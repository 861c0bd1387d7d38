"""Perceiver resampler and projector: user-encoder states -> a fixed number of
user tokens at the LLM's width.

The resampler (Flamingo / User-LLM) has `num_latents` learned queries; each
layer lets them cross-attend to [encoder states; latents] (padding masked out)
and then applies an MLP, both residual with pre-LayerNorm. The projector is a
two-layer GeLU MLP from the encoder width to the LLM width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

_init = nn.initializers.normal(stddev=0.02)


def _dense(features, axes, name):
  return nn.Dense(features, kernel_init=nn.with_logical_partitioning(_init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                         axes[-1:]), name=name)


def _norm(name):
  return nn.LayerNorm(
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class PerceiverLayer(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, latents, inputs, input_mask):
    """latents: [b, n, d]; inputs: [b, l, d]; input_mask: [b, l] -> [b, n, d]."""
    d = latents.shape[-1]
    head_dim = d // self.num_heads
    q_in = _norm("latent_norm")(latents)
    kv_in = jnp.concatenate([_norm("input_norm")(inputs), q_in], 1)
    kv_mask = jnp.concatenate([input_mask, jnp.ones(latents.shape[:2], bool)], 1)
    project = lambda name, x: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), use_bias=False, name=name,
        kernel_init=nn.with_logical_partitioning(_init, ("embed", "heads", "kv")))(x)
    q, k, v = project("query", q_in), project("key", kv_in), project("value", kv_in)
    logits = jnp.einsum("bnhd,blhd->bhnl", q, k) * head_dim ** -0.5
    logits = jnp.where(kv_mask[:, None, None, :], logits,
                       jnp.finfo(logits.dtype).min)
    attended = jnp.einsum("bhnl,blhd->bnhd", jax.nn.softmax(logits, -1), v)
    latents = latents + nn.DenseGeneral(
        d, axis=(-2, -1), use_bias=False, name="out",
        kernel_init=nn.with_logical_partitioning(_init, ("heads", "kv", "embed")))(
            attended)
    h = _dense(4 * d, ("embed", "mlp"), "mlp_in")(_norm("mlp_norm")(latents))
    return latents + _dense(d, ("mlp", "embed"), "mlp_out")(nn.gelu(h))


class PerceiverResampler(nn.Module):
  num_latents: int
  num_layers: int
  num_heads: int

  @nn.compact
  def __call__(self, inputs: jax.Array, input_mask: jax.Array) -> jax.Array:
    """inputs: [b, l, d], input_mask: [b, l] bool -> [b, num_latents, d]."""
    latents = self.param("latents", nn.with_logical_partitioning(
        _init, ("latents", "embed")), (self.num_latents, inputs.shape[-1]))
    latents = jnp.broadcast_to(latents.astype(inputs.dtype),
                               (inputs.shape[0], *latents.shape))
    for i in range(self.num_layers):
      latents = PerceiverLayer(self.num_heads, name=f"layer_{i}")(
          latents, inputs, input_mask)
    return _norm("final_norm")(latents)


class Projector(nn.Module):
  """[..., encoder width] -> [..., LLM width] by a two-layer GeLU MLP, then (with
  `normalise`) a LayerNorm, so every user token reaches the LLM at unit scale:
  without it the fresh MLP's output is ~0.01 per coordinate, 20-100x below
  the LLM's hidden states, and Adam's lr-sized steps take hundreds of steps to
  make the user tokens matter (README, "Where the user signal is lost")."""
  out_dim: int
  normalise: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(_dense(self.out_dim, ("embed", "mlp"), "hidden")(x))
    out = _dense(self.out_dim, ("mlp", "embed"), "out")(h)
    return _norm("out_norm")(out) if self.normalise else out
