"""Adapters on the LLM's projections: LoRA, mixture of LoRA and MoDE.

A frozen projection y = x W gets a trainable update added, y = x W + delta(x),
on the projections named in `AdapterConfig.targets` (attention `q`, `k`, `v`,
`out`; MLP `gate`, `up`, `down`). One module, `Adapter`, computes every kind in
one form: a down-projection to rank-r codes, routing weights that mix those
codes into expert slots `weighted` [..., E, r], and one up-projection
  delta = s * sum_{e, j} weighted[e, j] * B[e, j, :],   s = alpha / r,
with B zero at init, so a fresh adapter leaves the LLM's outputs unchanged.

Kinds (`AdapterConfig.kind`), for a token x:
- "lora": A [in, r], B [r, out]; delta = s (x A) B.
- "molora" (mixture of LoRA): E experts (A_e, B_e) of rank r and a router
  g(x) = softmax over E; delta = s sum_e g_e(x) (x A_e) B_e.
- "mode" (Mixture of Dyadic Experts, arXiv 2408.01505): one down-projection A
  [in, r] shared by every expert; each expert's B_e is r rank-one (dyadic)
  atoms b_{e,j}, and every atom j has its own router g_j(x) over the experts:
  delta = s sum_j (x a_j) sum_e g_{j,e}(x) b_{e,j}.
- "molora_sd": the paper's ablation between the two, MoLoRA with the shared
  down-projection but one router per token (not per atom).
Routers (`router`): "token" (logits x W_g), "task" (a learned table indexed by
the example's task id; every token of an example routes alike) or "token_task"
(the sum of both). `top_k` > 0 keeps the k largest logits and softmaxes over
them.

Trainable parameters per projection with input width I, output width O, T tasks
(R(n): router parameters for n routing logits: I n, T n or (I + T) n):
  lora      r (I + O)
  molora    E r (I + O) + R(E)
  mode      r I + E r O + R(E r)
  molora_sd r I + E r O + R(E)
so with E = r, MoDE and MoLoRA have exactly the same count on every projection.
`match_budget` picks the rank that brings a kind closest to another's count.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

KINDS = ("none", "lora", "molora", "mode", "molora_sd")
TARGETS = ("q", "k", "v", "out", "gate", "up", "down")
ROUTERS = ("token", "task", "token_task")
SUFFIX = "_adapter"  # parameter subtrees `<target>_adapter` hold an adapter


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  kind: str = "none"
  rank: int = 4
  alpha: float = 16.0  # scale s = alpha / rank
  num_experts: int = 4  # molora, mode, molora_sd
  top_k: int = 0  # 0: dense softmax over the experts
  router: str = "token"
  num_tasks: int = 0  # rows of the task router table
  targets: tuple[str, ...] = ("q", "k", "v", "out")

  @property
  def enabled(self) -> bool:
    return self.kind != "none"

  @property
  def experts(self) -> int:
    return 1 if self.kind == "lora" else self.num_experts

  @property
  def shared_down(self) -> bool:
    return self.kind in ("lora", "mode", "molora_sd")

  def routes(self) -> tuple[int, ...]:
    """Shape of one token's routing logits: () none, (E,), or (r, E) for MoDE."""
    if self.kind == "lora":
      return ()
    return (self.rank, self.num_experts) if self.kind == "mode" else (self.num_experts,)

  def validate(self) -> "AdapterConfig":
    checks = [
        (self.kind in KINDS, f"kind={self.kind!r} is not one of {KINDS}"),
        (self.rank >= 1, f"rank={self.rank} must be >= 1"),
        (self.num_experts >= 1, f"num_experts={self.num_experts} must be >= 1"),
        (0 <= self.top_k <= self.num_experts,
         f"top_k={self.top_k} must be in [0, num_experts={self.num_experts}]"),
        (self.router in ROUTERS, f"router={self.router!r} is not one of {ROUTERS}"),
        (self.router == "token" or self.num_tasks >= 1,
         f"router={self.router!r} needs num_tasks >= 1"),
        (set(self.targets) <= set(TARGETS) and len(self.targets) > 0,
         f"targets={self.targets} must be a non-empty subset of {TARGETS}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"adapter.{message}")
    return self


def _route(cfg: AdapterConfig, x_flat: jax.Array, token_router, task_router,
           task_ids) -> jax.Array:
  """Routing weights [..., *cfg.routes()], softmax (or top-k) over experts."""
  logits = 0.0
  if token_router is not None:
    logits = jnp.einsum("...i,in->...n", x_flat.astype(jnp.float32),
                        token_router.reshape(x_flat.shape[-1], -1))
    logits = logits.reshape(*logits.shape[:-1], *cfg.routes())
  if task_router is not None:
    if task_ids is None:
      raise ValueError(f"adapter.router={cfg.router!r} needs task_ids")
    per_example = task_router[task_ids].astype(jnp.float32)  # [b, *routes]
    extra = x_flat.ndim - 1 - per_example.ndim + len(cfg.routes())
    logits = logits + per_example.reshape(per_example.shape[:1] + (1,) * extra
                                          + per_example.shape[1:])
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.nn.softmax(logits, -1)


class Adapter(nn.Module):
  """delta(x) for one projection (see the module docstring)."""
  config: AdapterConfig
  in_axes: tuple[str | None, ...]  # logical axes of x's trailing input dims
  out_shape: tuple[int, ...]
  out_axes: tuple[str | None, ...]

  @nn.compact
  def __call__(self, x: jax.Array, task_ids: jax.Array | None = None) -> jax.Array:
    """x: [b, ..., *in] (len(in_axes) trailing input dims); task_ids: [b] int.

    Returns [b, ..., *out_shape] in x's dtype.
    """
    cfg = self.config
    n_in = len(self.in_axes)
    lead, in_shape = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    width = math.prod(in_shape)
    x_flat = x.reshape(*lead, width)
    e, r = cfg.experts, cfg.rank
    fan_in = nn.initializers.normal(stddev=width ** -0.5)
    param = lambda name, shape, axes, init: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, axes), shape)
    if cfg.shared_down:
      a = param("a", (*in_shape, r), (*self.in_axes, "lora"), fan_in)
      codes = jnp.einsum("...i,ir->...r", x_flat, a.reshape(width, r).astype(x.dtype))
    else:
      a = param("a", (e, *in_shape, r), ("experts", *self.in_axes, "lora"), fan_in)
      codes = jnp.einsum("...i,eir->...er", x_flat,
                         a.reshape(e, width, r).astype(x.dtype))  # [..., E, r]
    weighted = self._mix(codes, x_flat, in_shape, task_ids)  # [..., E, r]
    b = param("b", (e, r, *self.out_shape), ("experts", "lora", *self.out_axes),
              nn.initializers.zeros)
    delta = jnp.einsum("...er,ero->...o", weighted,
                       b.reshape(e, r, -1).astype(x.dtype))
    return delta.reshape(*lead, *self.out_shape) * (cfg.alpha / r)

  def _mix(self, codes, x_flat, in_shape, task_ids):
    """Routes the rank codes into expert slots: [..., E, r]."""
    cfg = self.config
    if cfg.kind == "lora":
      return codes[..., None, :]
    routes = cfg.routes()
    route_axes = ("lora", "experts") if cfg.kind == "mode" else ("experts",)
    token_router = task_router = None
    if cfg.router in ("token", "token_task"):
      token_router = self.param(
          "router", nn.with_logical_partitioning(
              nn.initializers.normal(0.02), (*self.in_axes, *route_axes)),
          (*in_shape, *routes))
    if cfg.router in ("task", "token_task"):
      task_router = self.param(
          "task_router", nn.with_logical_partitioning(
              nn.initializers.zeros, (None, *route_axes)), (cfg.num_tasks, *routes))
    gates = _route(cfg, x_flat, token_router, task_router, task_ids).astype(
        codes.dtype)
    if cfg.kind == "mode":  # gates [..., r, E]: atom j's weights over experts
      return codes[..., None, :] * jnp.swapaxes(gates, -1, -2)
    if cfg.kind == "molora_sd":  # gates [..., E]
      return codes[..., None, :] * gates[..., None]
    return codes * gates[..., None]  # molora: codes [..., E, r]


def projection_shapes(llm_config) -> dict[str, tuple[int, int]]:
  """{target: (input width I, output width O)} of one layer's projections."""
  c = llm_config
  return {"q": (c.embed_dim, c.num_heads * c.head_dim),
          "k": (c.embed_dim, c.num_kv_heads * c.head_dim),
          "v": (c.embed_dim, c.num_kv_heads * c.head_dim),
          "out": (c.num_heads * c.head_dim, c.embed_dim),
          "gate": (c.embed_dim, c.mlp_dim), "up": (c.embed_dim, c.mlp_dim),
          "down": (c.mlp_dim, c.embed_dim)}


def projection_count(cfg: AdapterConfig, width_in: int, width_out: int) -> int:
  """Trainable parameters of one adapter (the formulas in the docstring)."""
  if not cfg.enabled:
    return 0
  e, r = cfg.experts, cfg.rank
  routing_inputs = {"token": width_in, "task": cfg.num_tasks,
                    "token_task": width_in + cfg.num_tasks}[cfg.router]
  down = r * width_in if cfg.shared_down else e * r * width_in
  router = 0 if cfg.kind == "lora" else routing_inputs * math.prod(cfg.routes())
  return down + e * r * width_out + router


def formula_count(cfg: AdapterConfig, llm_config) -> int:
  """Trainable adapter parameters of the whole LLM, from the formulas."""
  shapes = projection_shapes(llm_config)
  return llm_config.num_layers * sum(projection_count(cfg, *shapes[t])
                                     for t in cfg.targets)


def _is_adapter(name: str) -> bool:
  return name.endswith(SUFFIX)


def split_adapters(params: dict) -> tuple[dict, dict]:
  """(adapters, base): the `<target>_adapter` subtrees of a (boxed or plain)
  parameter tree, each under its own path, and everything else. A tree
  without adapters gives ({}, params)."""
  return split_by_path(params, lambda path: any(_is_adapter(p) for p in path))


def merge_adapters(adapter_part: dict, base: dict) -> dict:
  """The whole tree: `adapter_part` put back into `base` (inverse of
  `split_adapters`)."""
  return merge_trees(adapter_part, base)


def split_by_path(params: dict, trained) -> tuple[dict, dict]:
  """(the leaves whose path `trained(path)` selects, the rest) of a nested
  dict of (boxed or plain) leaves, each under its own path; empty dicts are
  left out. `merge_trees` puts them back."""
  def walk(tree, prefix):
    chosen, rest = {}, {}
    for name, value in tree.items():
      path = prefix + (name,)
      if isinstance(value, dict):
        inner_chosen, inner_rest = walk(value, path)
        if inner_chosen:
          chosen[name] = inner_chosen
        if inner_rest:
          rest[name] = inner_rest
      elif trained(path):
        chosen[name] = value
      else:
        rest[name] = value
    return chosen, rest
  return walk(params, ())


def merge_trees(part: dict, base: dict) -> dict:
  """The whole tree: `part` put back into `base` (inverse of
  `split_by_path`; nothing is copied, only the dicts are new)."""
  out = dict(base)
  for name, value in part.items():
    out[name] = (merge_trees(value, base.get(name, {})) if isinstance(value, dict)
                 else value)
  return out


def tree_count(params) -> int:
  """Parameters under every `<target>_adapter` subtree of a parameter tree."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return int(sum(np.size(x) for path, x in leaves
                 if any(str(getattr(k, "key", "")).endswith(SUFFIX) for k in path)))


def match_budget(cfg: AdapterConfig, llm_config, budget: int,
                 max_rank: int = 1024) -> AdapterConfig:
  """`cfg` with the rank whose total count is closest to `budget` (ties: lower)."""
  counts = {r: formula_count(dataclasses.replace(cfg, rank=r), llm_config)
            for r in range(1, max_rank + 1)}
  best = min(counts, key=lambda r: (abs(counts[r] - budget), r))
  return dataclasses.replace(cfg, rank=best)


# Where each target's update folds into Gemma's parameters: (module, weight,
# index into the weight's leading axis or None, transpose of the [*in, *out]
# update into the weight's layout).
_FOLD = {"q": ("attn", "q_einsum", None, (1, 0, 2)),
         "k": ("attn", "kv_einsum", 0, (1, 0, 2)),
         "v": ("attn", "kv_einsum", 1, (1, 0, 2)),
         "out": ("attn", "attn_vec_einsum", None, (0, 1, 2)),
         "gate": ("mlp", "gating_einsum", 0, (0, 1)),
         "up": ("mlp", "gating_einsum", 1, (0, 1)),
         "down": ("mlp", "linear", None, (0, 1))}


def merge_lora(llm_params: dict, llm_config):
  """Folds trained LoRA updates into the base weights for inference.

  llm_params: a `DecoderLM`'s parameters with `kind="lora"` adapters. Returns
  (parameters without adapters, the LLMConfig without adapters); the merged LM
  computes the same function with no adapter cost. Mixtures route per token,
  so they have no single merged weight: asking to merge one is an error.
  """
  cfg = llm_config.adapter
  if cfg.kind != "lora":
    raise ValueError(f"only adapter.kind='lora' merges into the weights, not "
                     f"{cfg.kind!r} (its update depends on the routed token)")
  merged = jax.tree.map(lambda x: x, llm_params)  # a fresh dict tree
  scale = cfg.alpha / cfg.rank
  for i in range(llm_config.num_layers):
    layer = merged[f"layer_{i}"]
    for target in cfg.targets:
      module, weight, index, order = _FOLD[target]
      adapter = layer[module].pop(f"{target}{SUFFIX}")
      update = jnp.tensordot(adapter["a"], adapter["b"][0], axes=1) * scale
      update = jnp.transpose(update, order)
      base = layer[module][weight]
      base = (base + update.astype(base.dtype) if index is None
              else base.at[index].add(update.astype(base.dtype)))
      layer[module][weight] = base
  return merged, dataclasses.replace(llm_config, adapter=AdapterConfig())
