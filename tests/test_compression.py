"""Update compression (federated/compression.py): the quantisers are unbiased
and send the bits they claim, alpha* minimises TNQSGD's measured error on
Laplace samples and matches the closed-form bound, TNQSGD beats the uniform
schemes at equal bits on heavy tails, and the aggregator stage is exact when
it keeps everything."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from federated import aggregators, algorithms, compression
from test_federated_algorithms import (assert_trees_close, linear_losses,
                                       make_cohort, make_state)

SCHEMES = ("qsgd", "truncated_uniform", "tnqsgd")


def _laplace(n, b=1.0, seed=0):
  return jnp.asarray(np.random.default_rng(seed).laplace(0.0, b, n), jnp.float32)


def _draws(g, scheme, bits, n, alpha=None):
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  return jax.vmap(lambda k: compression.quantise(g, k, scheme, bits, alpha)[0])(keys)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantisers_are_unbiased_and_send_the_bits_they_claim(scheme):
  g = _laplace(32)
  draws = _draws(g, scheme, 3, 20_000)
  if scheme == "qsgd":
    expected = g
  else:  # unbiased for the truncated value
    alpha = compression.optimal_alpha(jnp.mean(jnp.abs(g)), 8)
    expected = jnp.clip(g, -alpha, alpha)
  spread = jnp.std(draws, 0) / np.sqrt(draws.shape[0])
  assert np.all(np.abs(np.asarray(draws.mean(0) - expected)) <= 5 * spread + 1e-5)
  assert len(np.unique(np.asarray(draws))) <= 8  # 2^3 levels (QSGD: sign x 4)
  _, bits = compression.quantise(g, jax.random.PRNGKey(0), scheme, 3)
  assert float(bits) == 32 * 3 + 32


def test_top_k_keeps_the_largest_and_counts_values_and_indices():
  g = jnp.asarray([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 0.05, 1.0])
  kept, bits = compression.top_k(g, 0.25)
  np.testing.assert_array_equal(kept, [0, -5.0, 0, 2.0, 0, 0, 0, 0])
  assert float(bits) == 2 * (32 + 3)


def _mse(g, scheme, bits, alpha=None, n=8):
  return float(jnp.mean(jnp.square(_draws(g, scheme, bits, n, alpha) - g)))


def test_alpha_star_minimises_the_measured_error_and_meets_the_bound():
  g = _laplace(100_000)
  b = float(jnp.mean(jnp.abs(g)))
  for bits in (3, 4):
    levels = 2 ** bits
    alpha = float(compression.optimal_alpha(b, levels))
    at_star = _mse(g, "tnqsgd", bits, alpha)
    for factor in (0.5, 0.7, 1.5, 2.0):
      assert at_star <= _mse(g, "tnqsgd", bits, factor * alpha) * 1.02, factor
    bound = compression.laplace_error_bound(b, levels)
    assert at_star == pytest.approx(bound, rel=0.35), (at_star, bound)


def test_tnqsgd_beats_the_uniform_schemes_at_equal_bits_on_heavy_tails():
  g = _laplace(50_000)
  for bits in (2, 3, 4):
    errors = {s: _mse(g, s, bits) for s in SCHEMES}
    assert errors["tnqsgd"] <= errors["truncated_uniform"] <= errors["qsgd"], errors


def test_compressed_aggregator_keeps_everything_exactly_and_reports_bits():
  client = algorithms.ClientSpec(optax.sgd(0.1), batch_size=2)
  cohort = make_cohort([3, 4, 0, 2], max_examples=4)
  plain = algorithms.ServerSpec(optax.sgd(1.0))
  everything = algorithms.ServerSpec(optax.sgd(1.0), aggregator=compression.compressed(
      aggregators.mean(), compression.Compressor("topk", fraction=1.0)))
  state = make_state(plain, client=client)
  a, _ = jax.jit(algorithms.make_round(linear_losses, client, plain))(state, cohort)
  b, metrics = jax.jit(algorithms.make_round(linear_losses, client, everything))(
      state, cohort)
  assert_trees_close(a.params, b.params)
  assert float(metrics["compression_error"]) == pytest.approx(0.0, abs=1e-12)
  assert float(metrics["bits_per_client"]) == (3 * (32 + 2)) + (1 * (32 + 1))
  quantised = algorithms.ServerSpec(optax.sgd(1.0), aggregator=compression.compressed(
      aggregators.mean(), compression.Compressor("tnqsgd", bits=4)))
  _, metrics = jax.jit(algorithms.make_round(linear_losses, client, quantised))(
      state, cohort)
  assert float(metrics["bits_per_client"]) == (3 * 4 + 32) + (1 * 4 + 32)
  assert 0 < float(metrics["compression_error"]) < 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_row_scales_are_unbiased_exact_in_bits_and_fit_rows_of_unequal_size(scheme):
  # an item table's update: a few rows (the items seen) 100x the rest
  rng = np.random.default_rng(3)
  g = rng.laplace(0.0, 1.0, (16, 8)) * np.where(np.arange(16) < 2, 100.0, 1.0)[:, None]
  g = jnp.asarray(g, jnp.float32)
  by_row = compression.Compressor(scheme, bits=3, scale="row")
  by_tensor = compression.Compressor(scheme, bits=3, scale="tensor")
  keys = jax.random.split(jax.random.PRNGKey(2), 2_000)
  draws = jax.vmap(lambda k: by_row.leaf(g, k)[0])(keys)
  if scheme == "qsgd":
    expected = g
  else:  # each row truncated at the alpha* of its own (bfloat16) scale
    b = jnp.mean(jnp.abs(g), 1, keepdims=True).astype(jnp.bfloat16).astype(jnp.float32)
    alpha = compression.optimal_alpha(b, 8)
    expected = jnp.clip(g, -alpha, alpha)
  spread = jnp.std(draws, 0) / np.sqrt(draws.shape[0])
  assert np.all(np.abs(np.asarray(draws.mean(0) - expected)) <= 5 * spread + 1e-4)
  assert float(by_row.leaf(g, keys[0])[1]) == 16 * (8 * 3 + 16)
  assert float(by_tensor.leaf(g, keys[0])[1]) == 16 * 8 * 3 + 32

  def mse(c):
    return float(jnp.mean(jnp.square(jax.vmap(lambda k: c.leaf(g, k)[0])(keys[:64]) - g)))
  assert mse(by_row) < 0.5 * mse(by_tensor)


def test_compression_config_names_the_bad_field():
  import ml_collections
  from infra.errors import ConfigError
  fed = ml_collections.ConfigDict(dict(compression=dict(
      scheme="tnqsgd", bits=2, fraction=0.01, scale="block")))
  with pytest.raises(ConfigError, match="compression.scale"):
    compression.from_config(fed)
  fed.compression.scale = "row"
  assert compression.from_config(fed) == compression.Compressor("tnqsgd", 2, 0.01, "row")
