"""DP-FedAvg (federated/aggregators.gaussian_dp) and its accounting
(federated/privacy.py): clipping bounds each client, the noise and the fixed
denominator are exact, zero noise equals clipped FedAvg, the accountant
matches dp-accounting's reference values, and the workflow reports epsilon."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ConfigReads, run_workflow
from federated import aggregators, algorithms, privacy
from infra.errors import ConfigError
from test_federated_algorithms import (assert_rounds_agree, assert_trees_close,
                                       linear_losses, make_cohort, make_state)


def _deltas(norms, dim=6, seed=0):
  """[clients] deltas {"a": [c, dim], "b": [c, 2]} with the given global norms."""
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(len(norms), dim)), rng.normal(size=(len(norms), 2))
  scale = np.asarray(norms) / np.sqrt((a ** 2).sum(1) + (b ** 2).sum(1))
  return {"a": jnp.asarray(a * scale[:, None], jnp.float32),
          "b": jnp.asarray(b * scale[:, None], jnp.float32)}


def _apply(agg, deltas, weights, seed=0):
  state = agg.init(None)
  return agg.apply(state, deltas, jnp.asarray(weights, jnp.float32),
                   jax.random.PRNGKey(seed))


def test_clipping_bounds_every_clients_contribution():
  agg = aggregators.gaussian_dp(clip_norm=1.0, noise_multiplier=0.0,
                                expected_clients=4)
  deltas = _deltas([0.5, 3.0, 100.0, 1e6])
  aggregate, _, metrics = _apply(agg, deltas, [1, 1, 1, 1])
  for c in range(4):  # one client alone contributes min(|delta|, C) / m
    alone = jax.tree.map(lambda d: d * (jnp.arange(4) == c)[:, None], deltas)
    single, _, _ = _apply(agg, alone, [1, 1, 1, 1])
    norm = float(aggregators.client_norms(jax.tree.map(lambda x: x[None], single))[0])
    assert norm * 4 == pytest.approx(min([0.5, 3.0, 100.0, 1e6][c], 1.0), rel=1e-5)
  assert float(metrics["dp_clipped_fraction"]) == 0.75
  total = float(aggregators.client_norms(jax.tree.map(lambda x: x[None],
                                                      aggregate))[0])
  assert total * 4 <= 4 * 1.0 + 1e-5


def test_noise_std_and_the_fixed_denominator_are_exact():
  m, clip, z = 4, 0.5, 2.0
  agg = aggregators.gaussian_dp(clip, z, m)
  zeros = {"w": jnp.zeros((m, 200_000))}
  aggregate, _, _ = _apply(agg, zeros, [1, 1, 1, 1])
  assert float(jnp.std(aggregate["w"])) == pytest.approx(z * clip / m, rel=0.01)
  assert abs(float(jnp.mean(aggregate["w"]))) < 3 * z * clip / m / np.sqrt(2e5) * 3
  # a client that dropped out (weight 0) leaves the denominator at m
  no_noise = aggregators.gaussian_dp(10.0, 0.0, m)
  deltas = _deltas([1.0, 2.0, 3.0, 4.0])
  aggregate, _, _ = _apply(no_noise, deltas, [1, 1, 1, 0])
  expected = jax.tree.map(lambda d: d[:3].sum(0) / m, deltas)
  assert_trees_close(aggregate, expected)


def test_zero_noise_dp_round_equals_the_fedavg_round_of_clipped_updates():
  client = algorithms.ClientSpec(optax.sgd(0.1), local_epochs=2, batch_size=2)
  cohort = make_cohort([3, 4, 2, 5], max_examples=5)
  fedavg = algorithms.ServerSpec(optax.sgd(1.0), weighting="uniform")
  state = make_state(fedavg, client=client)
  plain, _ = jax.jit(algorithms.make_round(linear_losses, client, fedavg))(
      state, cohort)
  # a bound no update reaches: the DP round is FedAvg's with uniform weights
  dp = algorithms.ServerSpec(optax.sgd(1.0), weighting="uniform",
                             aggregator=aggregators.gaussian_dp(1e6, 0.0, 4))
  private, metrics = jax.jit(algorithms.make_round(linear_losses, client, dp))(
      make_state(dp, client=client), cohort)
  assert_trees_close(private.params, plain.params)
  assert float(metrics["dp_clipped_fraction"]) == 0.0
  # a bound every update exceeds: the server moves by at most C
  tight = algorithms.ServerSpec(optax.sgd(1.0), weighting="uniform",
                                aggregator=aggregators.gaussian_dp(1e-3, 0.0, 4))
  clipped, metrics = jax.jit(algorithms.make_round(linear_losses, client, tight))(
      make_state(tight, client=client), cohort)
  moved = jax.tree.map(lambda a, b: a - b, clipped.params, state.params)
  assert float(optax.tree.norm(moved)) <= 1e-3 + 1e-7
  assert float(metrics["dp_clipped_fraction"]) == 1.0


def test_dp_round_vmapped_equals_looped():
  client = algorithms.ClientSpec(optax.sgd(0.1), batch_size=2)
  server = algorithms.ServerSpec(optax.sgd(1.0), weighting="uniform",
                                 dropout_rate=0.3,
                                 aggregator=aggregators.gaussian_dp(0.05, 1.0, 4))
  assert_rounds_agree(jax.jit(algorithms.make_round(linear_losses, client, server)),
                      algorithms.make_looped_round(linear_losses, client, server),
                      make_state(server, client=client))


def test_adaptive_clip_moves_toward_the_target_quantile():
  agg = aggregators.gaussian_dp(0.1, 0.0, 4, target_quantile=0.5,
                                clip_learning_rate=0.2)
  deltas = _deltas([1.0, 1.0, 1.0, 1.0])
  state = agg.init(None)
  for _ in range(3):  # every norm is above C: C grows
    _, state, _ = agg.apply(state, deltas, jnp.ones(4), jax.random.PRNGKey(0))
  assert float(state["clip_norm"]) == pytest.approx(0.1 * np.exp(0.2 * 0.5) ** 3,
                                                    rel=1e-5)
  _, shrunk, _ = agg.apply({"clip_norm": jnp.float32(5.0)}, deltas, jnp.ones(4),
                           jax.random.PRNGKey(0))
  assert float(shrunk["clip_norm"]) == pytest.approx(5.0 * np.exp(-0.2 * 0.5))


def test_accountant_matches_dp_accounting_reference_values():
  # q = 100 / 10,000 clients a round, z = 1, 1,000 rounds, delta = 1e-6
  assert privacy.epsilon(1.0, 0.01, 1000, 1e-6, "rdp") == pytest.approx(2.44, abs=0.01)
  assert privacy.epsilon(1.0, 0.01, 1000, 1e-6, "pld") == pytest.approx(2.13, abs=0.01)
  z = privacy.noise_for_epsilon(2.44, 0.01, 1000, 1e-6, "rdp")
  assert z == pytest.approx(1.0, abs=0.01)
  assert privacy.epsilon(z, 0.01, 1000, 1e-6) <= 2.44
  assert privacy.epsilon(0.0, 0.01, 10, 1e-6) == float("inf")
  assert privacy.epsilon(2.0, 0.01, 10, 1e-6) < privacy.epsilon(1.0, 0.01, 10, 1e-6)


def test_dp_config_errors_name_the_field():
  from configs import dp_fedavg
  fed = dp_fedavg.get_config().federated
  fed.weighting = "examples"
  with pytest.raises(ConfigError, match="weighting='uniform'"):
    aggregators.from_config(fed, privacy.budget(fed, 1000, 10))
  fed.weighting = "uniform"
  fed.dp.accountant = "moments"
  with pytest.raises(ConfigError, match="config.federated.dp.accountant='moments'"):
    privacy.budget(fed, 1000, 10)
  fed.dp.accountant = "rdp"
  with pytest.raises(ConfigError, match="more than the 10 participating"):
    privacy.budget(fed, 10, 10)


def test_dp_workflow_reports_epsilon_each_evaluation(tmp_path):
  from configs import dp_fedavg
  config = dp_fedavg.get_config("tiny")
  config.federated.dp.target_epsilon = 8.0
  with ConfigReads() as reads:
    results = run_workflow(config, tmp_path)
  assert reads.unread(config) == []  # the config holds only what is read
  assert results["dp_epsilon"] <= 8.0 + 1e-6 and results["dp_noise_multiplier"] > 0
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  spent = [r["dp_epsilon"] for r in rows if r["split"] == "valid"]
  assert len(spent) == 2 and 0 < spent[0] < spent[1] == results["dp_epsilon"]
  train = [r for r in rows if r["split"] == "federated"]
  assert all(0 <= r["dp_clipped_fraction"] <= 1 for r in train)
