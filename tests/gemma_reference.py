"""A clean-room forward pass of the published Gemma 1 / 2 / 3 text models, in
float64 numpy, over a checkpoint in the released flat layout
(`transformer/layer_0/attn/q_einsum -> {"w": array}`).

Written from the architecture as published (the Gemma, Gemma 2 and Gemma 3
technical reports), independently of `userllm.models.llm`: one loop over layers, no
cache, no padding, positions 0..T-1. It is what the parity tests compare our
decoder against, so it shares none of its code.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a checkpoint does not hold: the family's published constants."""
  family: str = "gemma1"  # gemma1 | gemma2 | gemma3
  attn_softcap: float | None = None  # Gemma 2: 50
  final_softcap: float | None = None  # Gemma 2: 30
  window: int | None = None  # sliding window of local layers
  pattern: int = 1  # a global layer every `pattern` layers (the last of each)
  local_base: float = 10_000.0
  global_base: float = 10_000.0
  global_scale: float = 1.0  # Gemma 3 4B+: global positions / 8
  query_scalar: float | None = None  # default head_dim ** -0.5


def _w(params: dict, key: str) -> np.ndarray:
  value = params[key]
  return np.asarray(value["w"] if isinstance(value, dict) and "w" in value else value,
                    np.float64)


def _scale(params: dict, key: str) -> np.ndarray:
  return np.asarray(params[key]["scale"], np.float64)


def rms_norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * (1.0 + scale)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def rope(x: np.ndarray, base: float, scale: float) -> np.ndarray:
  """x: [T, heads, d]; rotates the two halves of d by position / scale."""
  t, _, d = x.shape
  timescale = base ** (2 * np.arange(d // 2) / d)
  angle = (np.arange(t)[:, None] / scale) / timescale[None, :]  # [T, d/2]
  sin, cos = np.sin(angle)[:, None, :], np.cos(angle)[:, None, :]
  a, b = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def forward(params: dict, tokens: np.ndarray, s: Settings) -> np.ndarray:
  """params: the released flat layout; tokens: [T] int -> logits [T, rows]."""
  table = np.asarray(params["transformer/embedder"]["input_embedding"], np.float64)
  x = table[tokens] * np.sqrt(table.shape[1])
  t = len(tokens)
  layers = sorted({k.split("/")[1] for k in params if k.startswith("transformer/layer_")},
                  key=lambda n: int(n.split("_")[1]))
  for i, name in enumerate(layers):
    root = f"transformer/{name}"
    is_global = s.window is None or (i + 1) % s.pattern == 0
    h = rms_norm(x, _scale(params, f"{root}/pre_attention_norm"))
    if f"{root}/attn/qkv_einsum" in params:
      qkv = _w(params, f"{root}/attn/qkv_einsum")
      wq, wk, wv = qkv[0], qkv[1], qkv[2]
    else:
      wq = _w(params, f"{root}/attn/q_einsum")
      kv = _w(params, f"{root}/attn/kv_einsum")
      wk, wv = kv[0], kv[1]
    q = np.einsum("td,ndh->tnh", h, wq)
    k = np.einsum("td,ndh->tnh", h, wk)
    v = np.einsum("td,ndh->tnh", h, wv)
    if s.family == "gemma3":
      q = rms_norm(q, _scale(params, f"{root}/attn/_query_norm"))
      k = rms_norm(k, _scale(params, f"{root}/attn/_key_norm"))
    base, scale = ((s.global_base, s.global_scale) if is_global
                   else (s.local_base, 1.0))
    head_dim = q.shape[-1]
    q = rope(q, base, scale) * (s.query_scalar or head_dim ** -0.5)
    k = rope(k, base, scale)
    repeat = q.shape[1] // k.shape[1]  # grouped-query: kv head j serves a group
    k, v = np.repeat(k, repeat, axis=1), np.repeat(v, repeat, axis=1)
    logits = np.einsum("qnh,knh->nqk", q, k)
    if s.attn_softcap:
      logits = np.tanh(logits / s.attn_softcap) * s.attn_softcap
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = ki <= qi
    if not is_global:
      allowed &= (qi - ki) < s.window
    logits = np.where(allowed[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("nqk,knh->qnh", probs, v)
    out = np.einsum("tnh,nhd->td", attended, _w(params, f"{root}/attn/attn_vec_einsum"))
    if s.family != "gemma1":
      out = rms_norm(out, _scale(params, f"{root}/post_attention_norm"))
    x = x + out
    h = rms_norm(x, _scale(params, f"{root}/pre_ffw_norm"))
    gating = _w(params, f"{root}/mlp/gating_einsum")
    if s.family == "gemma3":  # released as [2, mlp, embed]
      gating = gating.transpose(0, 2, 1)
    gate, up = np.einsum("td,cdf->ctf", h, gating)
    out = (gelu_tanh(gate) * up) @ _w(params, f"{root}/mlp/linear")
    if s.family != "gemma1":
      out = rms_norm(out, _scale(params, f"{root}/post_ffw_norm"))
    x = x + out
  x = rms_norm(x, _scale(params, "transformer/final_norm"))
  logits = x @ table.T
  if s.final_softcap:
    logits = np.tanh(logits / s.final_softcap) * s.final_softcap
  return logits
