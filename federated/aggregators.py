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
AGGREGATORS = ("mean",)


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


def from_config(fed) -> Aggregator:
  """The aggregator `config.federated.aggregator` names."""
  if fed.aggregator == "mean":
    return mean()
  raise ConfigError(f"config.federated.aggregator={fed.aggregator!r} is not one "
                    f"of {AGGREGATORS}")
