"""Aggregators: how the server turns the cohort's client deltas into one update.

An aggregator is a pair of pure functions with its own state (which rides in
the server state, so it is checkpointed and resumed with it):

    state = aggregator.init(params)
    aggregate, state, metrics = aggregator.apply(state, deltas, weights, rng)

with `deltas` a pytree of [clients, ...] stacked client deltas and `weights`
[clients] (0 for clients that dropped out or had no data). Later stages of the
pipeline (clip-and-noise for differential privacy, truncation + quantisation,
similarity-weighted personalised aggregation) are aggregators of this shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from infra.errors import ConfigError

PyTree = Any
AGGREGATORS = ("mean", "dp")


@dataclasses.dataclass(frozen=True)
class Aggregator:
  """init(params) -> state; apply(state, deltas [clients, ...], weights
  [clients], rng) -> (aggregate like params, state, metrics dict)."""
  init: Callable[[PyTree], PyTree]
  apply: Callable[[PyTree, PyTree, jax.Array, jax.Array],
                  tuple[PyTree, PyTree, dict]]


def weighted_mean(deltas: PyTree, weights: jax.Array) -> PyTree:
  """sum_c weights[c] * deltas[c] / sum_c weights[c]; zeros when all weights are 0.

  deltas: pytree of [clients, ...]; weights: [clients].
  """
  total = weights.sum()
  scale = jnp.where(total > 0, 1.0 / jnp.maximum(total, 1e-12), 0.0)
  return jax.tree.map(
      lambda d: jnp.tensordot(weights * scale, d, axes=1).astype(d.dtype), deltas)


def mean() -> Aggregator:
  """The weighted mean of the deltas (FedAvg); stateless."""

  def apply(state, deltas, weights, rng):
    del rng
    return weighted_mean(deltas, weights), state, {}

  return Aggregator(init=lambda params: (), apply=apply)


def client_norms(deltas: PyTree) -> jax.Array:
  """[clients] the L2 norm of each client's whole delta (every leaf)."""
  squares = [jnp.sum(jnp.square(d.astype(jnp.float32)).reshape(d.shape[0], -1), 1)
             for d in jax.tree.leaves(deltas)]
  return jnp.sqrt(sum(squares))


def gaussian_dp(clip_norm: float, noise_multiplier: float, expected_clients: int,
                target_quantile: float = 0.0, clip_learning_rate: float = 0.2,
                count_noise_std: float = 0.0) -> Aggregator:
  """DP-FedAvg's aggregation (McMahan et al. 2018; TFF's `gaussian_fixed`):

      aggregate = (sum_c min(1, C / |delta_c|) delta_c + N(0, (z C)^2 I)) / m

  over the clients with weight > 0 (each counts once: weights are only a
  participation indicator), with the fixed denominator m = `expected_clients`
  (the cohort size, however many finish), so one client changes the sum by at
  most C and the noise std of the aggregate is exactly z C / m.

  `target_quantile` > 0 adapts C (Andrew et al. 2021, geometric update):
  C <- C exp(-eta (b - gamma)), b the noisy fraction of the cohort whose norm
  was <= C (count noise std `count_noise_std`), gamma the target quantile,
  eta = `clip_learning_rate`. The state is C.
  """
  def init(params):
    del params
    return {"clip_norm": jnp.asarray(clip_norm, jnp.float32)}

  def apply(state, deltas, weights, rng):
    bound = state["clip_norm"]
    taking_part = (weights > 0).astype(jnp.float32)
    norms = client_norms(deltas)
    scale = taking_part * jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-12))
    leaves, tree = jax.tree.flatten(deltas)
    noise_key, count_key = jax.random.split(rng)
    keys = jax.random.split(noise_key, len(leaves))
    aggregate = jax.tree.unflatten(tree, [
        ((jnp.tensordot(scale, d, axes=1)
          + noise_multiplier * bound * jax.random.normal(k, d.shape[1:]))
         / expected_clients).astype(d.dtype) for d, k in zip(leaves, keys)])
    under = jnp.sum(taking_part * (norms <= bound))
    new_state = state
    if target_quantile > 0:
      noisy_under = under + count_noise_std * jax.random.normal(count_key)
      fraction = noisy_under / expected_clients
      new_state = {"clip_norm": bound * jnp.exp(
          -clip_learning_rate * (fraction - target_quantile))}
    clients = jnp.maximum(taking_part.sum(), 1.0)
    metrics = {"dp_clip_norm": bound,
               "dp_clipped_fraction": (taking_part.sum() - under) / clients,
               "dp_mean_norm": jnp.sum(taking_part * norms) / clients}
    return aggregate, new_state, metrics

  return Aggregator(init=init, apply=apply)


def from_config(fed, dp_budget=None) -> Aggregator:
  """The aggregator `config.federated.aggregator` names. "dp" reads
  `config.federated.dp` and takes its noise from `dp_budget`
  (federated/privacy.budget: z resolved from a target epsilon, and the split
  of the noise between the update and the adaptive clip's count)."""
  if fed.aggregator == "mean":
    return mean()
  if fed.aggregator == "dp":
    dp = fed.dp
    if fed.weighting != "uniform":
      raise ConfigError("config.federated.aggregator='dp' counts every client "
                        "once: set config.federated.weighting='uniform' (got "
                        f"{fed.weighting!r})")
    if dp.clip_norm <= 0:
      raise ConfigError(f"config.federated.dp.clip_norm={dp.clip_norm} must be > 0")
    if dp_budget is None:
      raise ConfigError("config.federated.aggregator='dp' needs its privacy "
                        "budget (federated/privacy.budget)")
    return gaussian_dp(dp.clip_norm, dp_budget.update_noise_multiplier,
                       fed.clients_per_round, dp.target_quantile,
                       dp.clip_learning_rate, dp_budget.count_noise_std)
  raise ConfigError(f"config.federated.aggregator={fed.aggregator!r} is not one "
                    f"of {AGGREGATORS}")
