"""FELLRec's dynamic balance (federated/personalisation.py): the formula on a
hand-worked cohort, identical clients equal FedAvg, the curriculum lets a
lagging client keep more of its own model, vmapped == looped."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from federated import algorithms, personalisation
from infra.errors import ConfigError
from test_federated_algorithms import (_fed_config, assert_rounds_agree,
                                       assert_trees_close, linear_losses,
                                       make_cohort, make_state)


def _fellrec_specs(**fellrec):
  personal = personalisation.FELLRec(**fellrec)
  client = algorithms.ClientSpec(optax.sgd(0.1), batch_size=2,
                                 state_init=personal.state_init,
                                 start=personal.start)
  server = algorithms.ServerSpec(optax.sgd(1.0), personalise=personal.personalise)
  return client, server


def test_personalised_deltas_follow_the_formula():
  deltas = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0]])}
  losses = jnp.array([0.3, 0.1, 0.2, 9.0])
  weights = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last client dropped out
  mixed, parts = personalisation.personalised_deltas(
      deltas, losses, weights, jnp.asarray(2), alpha=0.7, beta=1.0,
      temperature=0.05)
  d = np.asarray(deltas["w"])[:3]
  unit = d / np.linalg.norm(d, axis=1, keepdims=True)
  s = (unit @ unit.T + 1) / 2
  np.fill_diagonal(s, 0.0)
  a = s / s.sum(1, keepdims=True)
  l = np.exp(np.asarray(losses[:3]) / 0.05)
  l /= l.sum()
  w = np.tanh(0.7 / l ** (2 + 1.0))
  expected = (1 - w)[:, None] * d + w[:, None] * (a @ d)
  np.testing.assert_allclose(mixed["w"][:3], expected, rtol=1e-5)
  np.testing.assert_allclose(parts["w"][:3], w, rtol=1e-5)
  np.testing.assert_allclose(mixed["w"][3], [5.0, 5.0])  # absent: its own D
  # the client with the highest loss keeps the most of its own update
  assert int(np.argmin(w)) == int(np.argmax(np.asarray(losses[:3])))
  # the round's balance metrics, over the clients that finished it
  metrics = personalisation.balance_metrics(parts, weights > 0)
  np.testing.assert_allclose(metrics["balance_w_mean"], w.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["balance_w_min"], w.min(), rtol=1e-5)
  np.testing.assert_allclose(metrics["balance_own_kept"], np.mean(w <= 0.5))
  np.testing.assert_allclose(metrics["balance_attention_max"], a.max(1).mean(),
                             rtol=1e-5)


def test_attention_may_include_the_client_itself():
  sim = jnp.array([[1.0, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 1.0]])
  present = jnp.array([True, True, False])
  others = personalisation.attention(sim, present)
  np.testing.assert_allclose(others[:2], [[0, 1, 0], [1, 0, 0]], atol=1e-7)
  with_self = personalisation.attention(sim, present, include_self=True)
  np.testing.assert_allclose(with_self[0], [1 / 1.5, 0.5 / 1.5, 0], rtol=1e-6)
  np.testing.assert_allclose(with_self[2], [0, 0, 0])  # absent: nothing


def test_heating_rises_toward_one_over_rounds():
  losses, present = jnp.array([1.0, 0.9, 0.2]), jnp.ones(3, bool)
  early, late = (personalisation.heating_weights(losses, present, jnp.asarray(r),
                                                 0.7, 1.0, 0.05) for r in (0, 30))
  assert float(early[0]) < 0.7 and np.all(np.asarray(late) > early - 1e-7)
  np.testing.assert_allclose(late[1:], 1.0, atol=1e-6)
  assert np.all(np.isfinite(late))


def test_identical_clients_get_the_fedavg_model():
  client, server = _fellrec_specs()
  fedavg_client = algorithms.ClientSpec(optax.sgd(0.1), batch_size=2)
  fedavg_server = algorithms.ServerSpec(optax.sgd(1.0))
  one = make_cohort([4], seed=3)
  cohort = {k: jnp.repeat(v, 3, axis=0) for k, v in one.items()}
  cohort["client_rows"] = jnp.array([0, 1, 2], jnp.int32)
  cohort["client_ids"] = jnp.zeros(3, jnp.int32)  # one seed: the same steps
  state, _ = jax.jit(algorithms.make_round(linear_losses, client, server))(
      make_state(server, client=client), cohort)
  fedavg, _ = jax.jit(algorithms.make_round(linear_losses, fedavg_client,
                                            fedavg_server))(
      make_state(fedavg_server, client=fedavg_client), cohort)
  assert_trees_close(state.params, fedavg.params)
  for row in range(3):
    assert_trees_close(jax.tree.map(lambda x: x[row],
                                    state.client_states["params"]), fedavg.params)
  np.testing.assert_array_equal(state.client_states["trained"],
                                [True, True, True] + [False] * 5)


def test_clients_start_from_their_own_model_once_they_have_one():
  client, server = _fellrec_specs()
  round_fn = jax.jit(algorithms.make_round(linear_losses, client, server))
  state = make_state(server, client=client)
  state, _ = round_fn(state, make_cohort([3, 2, 4], seed=0))
  own = jax.tree.map(lambda x: x[1], state.client_states["params"])
  assert not np.allclose(own["w"], state.params["w"])  # personalised
  started = client.start(state.params, jax.tree.map(lambda x: x[1],
                                                    state.client_states))
  assert_trees_close(started, own)
  fresh = client.start(state.params, jax.tree.map(lambda x: x[6],
                                                  state.client_states))
  assert_trees_close(fresh, state.params)


def test_fellrec_round_vmapped_equals_looped():
  client, server = _fellrec_specs()
  server = dataclasses.replace(server, dropout_rate=0.3)
  assert_rounds_agree(jax.jit(algorithms.make_round(linear_losses, client, server)),
                      algorithms.make_looped_round(linear_losses, client, server),
                      make_state(server, client=client))


def test_fellrec_config():
  client, server = algorithms.specs_from_config(
      _fed_config(personalisation="fellrec"))
  assert server.personalise is not None
  assert set(client.state_init({"w": jnp.zeros(2)})) == {"params", "trained"}
  with pytest.raises(ConfigError, match="config.federated.personalisation"):
    algorithms.specs_from_config(_fed_config(personalisation="ditto"))
  fed = _fed_config(personalisation="fellrec")
  fed.fellrec.temperature = 0.0
  with pytest.raises(ConfigError, match="config.federated.fellrec.temperature"):
    algorithms.specs_from_config(fed)
