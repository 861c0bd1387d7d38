"""Mixed FL (federated/algorithms.py, `ServerSpec.mixing`): parallel training,
1-way and 2-way gradient transfer against their closed forms on a quadratic,
their fixed points, 1-way with a zero server loss is FedAvg, the round's
gradient through the server loss matches finite differences, vmapped ==
looped."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from federated import algorithms
from infra.errors import ConfigError
from test_federated_algorithms import assert_trees_close

DIM = 3
A = np.array([[1.0, 0.0, 2.0], [3.0, -2.0, 0.0]], np.float32)  # the clients' optima
B = np.array([-1.0, 4.0, 1.0], np.float32)  # the server's optimum
X0 = np.array([0.5, 0.5, -0.5], np.float32)


def quadratic_losses(params, examples, rng):
  """f_k: 1/2 |w - e|^2 per example; every example of client k is a_k."""
  del rng
  return 0.5 * jnp.sum((params["w"][None] - examples) ** 2, axis=1)


def server_loss(params, batch, rng):
  """f_c = 1/2 |w - b|^2 with b the server batch."""
  del rng
  return 0.5 * jnp.sum((params["w"] - batch) ** 2)


def cohort(examples_per_client=2):
  examples = np.repeat(A[:, None], examples_per_client, axis=1)
  return {"examples": jnp.asarray(examples),
          "num_examples": jnp.full((2,), examples_per_client, jnp.int32),
          "client_ids": jnp.arange(2, dtype=jnp.int32),
          "client_rows": jnp.arange(2, dtype=jnp.int32),
          "server_batch": jnp.asarray(B)}


def specs(mixing, lr=0.3, local_epochs=1, steps=2, central_lr=0.2):
  client = algorithms.ClientSpec(optax.sgd(lr), local_epochs=local_epochs,
                                 batch_size=None)
  server = algorithms.ServerSpec(optax.sgd(1.0), server_loss=server_loss,
                                 mixing=mixing, central_steps=steps,
                                 central_learning_rate=central_lr)
  return client, server


def state_for(server, client, x=X0):
  return algorithms.init_server_state({"w": jnp.asarray(x)}, client, server,
                                      jax.random.PRNGKey(0), 2)


def one_round(mixing, **kw):
  client, server = specs(mixing, **kw)
  new, _ = jax.jit(algorithms.make_round(quadratic_losses, client, server))(
      state_for(server, client), cohort())
  return np.asarray(new.params["w"])


def test_one_round_matches_the_closed_forms():
  lr, clr, x, a_bar = 0.3, 0.2, X0.astype(np.float64), A.mean(0)
  # parallel: D_f = -lr (x - a_bar); two server steps on f_c from x
  y = x.copy()
  for _ in range(2):
    y = y - clr * (y - B)
  np.testing.assert_allclose(one_round("parallel"), x - lr * (x - a_bar) + (y - x),
                             rtol=1e-5, atol=1e-6)
  # one_way: each local step descends f_k + <g_c(x), w>
  d_f = -lr * (2 * x - a_bar - B)
  np.testing.assert_allclose(one_round("one_way"), x + d_f, rtol=1e-5, atol=1e-6)
  # two_way: the server's steps add the federated gradient x - a_bar
  y = x.copy()
  for _ in range(2):
    y = y - clr * ((y - B) + (x - a_bar))
  np.testing.assert_allclose(one_round("two_way"), x + d_f + (y - x), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("mixing", ["parallel", "one_way", "two_way"])
def test_fixed_points(mixing):
  """one_way and two_way reach argmin f_f + f_c = (a_bar + b) / 2 whatever the
  budgets; parallel reaches (alpha a_bar + beta b) / (alpha + beta), alpha = 1 -
  (1 - lr)^K, beta = 1 - (1 - lr_c)^S, its budget-weighted compromise."""
  lr, clr, epochs, steps = 0.1, 0.3, 3, 2
  client, server = specs(mixing, lr=lr, local_epochs=epochs, steps=steps,
                         central_lr=clr)
  round_fn = jax.jit(algorithms.make_round(quadratic_losses, client, server))
  state = state_for(server, client)
  for _ in range(150):
    state, _ = round_fn(state, cohort())
  a_bar = A.mean(0)
  if mixing == "parallel":
    alpha, beta = 1 - (1 - lr) ** epochs, 1 - (1 - clr) ** steps
    expected = (alpha * a_bar + beta * B) / (alpha + beta)
  else:
    expected = (a_bar + B) / 2
  np.testing.assert_allclose(state.params["w"], expected, atol=1e-4)


def test_one_way_with_a_zero_server_loss_is_fedavg():
  client, _ = specs("one_way")
  zero = algorithms.ServerSpec(optax.sgd(1.0), mixing="one_way",
                               server_loss=lambda p, b, r: 0.0 * server_loss(p, b, r))
  plain = algorithms.ServerSpec(optax.sgd(1.0))
  mixed, _ = jax.jit(algorithms.make_round(quadratic_losses, client, zero))(
      state_for(zero, client), cohort())
  fedavg, _ = jax.jit(algorithms.make_round(quadratic_losses, client, plain))(
      state_for(plain, client), cohort())
  assert_trees_close(mixed.params, fedavg.params)


def test_gradient_through_the_round_matches_finite_differences():
  """d sum(w after a two_way round) / d b, through the vmapped clients and the
  server's steps, against central differences."""
  client, server = specs("two_way")
  round_fn = algorithms.make_round(quadratic_losses, client, server)
  state = state_for(server, client)

  def after(b):
    new, _ = round_fn(state, {**cohort(), "server_batch": b})
    return jnp.sum(new.params["w"] * jnp.array([1.0, -2.0, 0.5]))

  grad = np.asarray(jax.grad(after)(jnp.asarray(B)))
  eps = 1e-2
  numeric = [(after(jnp.asarray(B) + eps * e) - after(jnp.asarray(B) - eps * e))
             / (2 * eps) for e in np.eye(DIM, dtype=np.float32)]
  np.testing.assert_allclose(grad, np.asarray(numeric), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mixing", ["parallel", "two_way"])
def test_mixed_round_vmapped_equals_looped(mixing):
  client, server = specs(mixing)
  client = dataclasses.replace(client, batch_size=1, local_epochs=2)
  server = dataclasses.replace(server, dropout_rate=0.4)
  vmapped = jax.jit(algorithms.make_round(quadratic_losses, client, server))
  looped = algorithms.make_looped_round(quadratic_losses, client, server)
  state_v = state_l = state_for(server, client)
  data = cohort(3)
  data["num_examples"] = jnp.array([3, 1], jnp.int32)
  for _ in range(3):
    state_v, metrics_v = vmapped(state_v, data)
    state_l, metrics_l = looped(state_l, data)
  assert_trees_close(state_v.params, state_l.params)
  assert_trees_close(metrics_v, metrics_l)


def test_bad_mixing_is_a_config_error():
  client, server = specs("three_way")
  with pytest.raises(ConfigError, match="mixed.algorithm='three_way'"):
    algorithms.make_round(quadratic_losses, client, server)
  client, server = specs("parallel", steps=0)
  with pytest.raises(ConfigError, match="central_steps"):
    algorithms.make_round(quadratic_losses, client, server)
