"""The FedAvg family as pure functions: equalities with centralised training,
padding invariance, dropouts, vmapped == looped, sharded == single device."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data import sequences
from federated import algorithms, clients
from infra import mesh as mesh_lib

DIM = 3


def linear_losses(params, examples, rng):
  """Squared error of a linear model; examples [batch, DIM + 1] = (x, y)."""
  del rng
  x, y = examples[:, :DIM], examples[:, DIM]
  return (x @ params["w"] + params["b"] - y) ** 2


def mean_loss(params, examples):
  return jnp.mean(linear_losses(params, examples, None))


def make_state(server, seed=0, client=None, num_clients=8):
  """The round-0 ServerState of the linear model (server: a ServerSpec)."""
  params = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array(0.05)}
  client = client or algorithms.ClientSpec(optax.sgd(0.1))
  return algorithms.init_server_state(params, client, server,
                                      jax.random.PRNGKey(seed), num_clients)


def make_cohort(sizes, max_examples=None, seed=0):
  """Clients with `sizes` real examples each, zero-padded to max_examples."""
  rng = np.random.default_rng(seed)
  width = max_examples or max(max(sizes), 1)
  examples = np.zeros((len(sizes), width, DIM + 1), np.float32)
  for c, n in enumerate(sizes):
    examples[c, :n] = rng.normal(size=(n, DIM + 1))
  return {"examples": jnp.asarray(examples),
          "num_examples": jnp.asarray(sizes, jnp.int32),
          "client_ids": jnp.arange(len(sizes), dtype=jnp.int32),
          "client_rows": jnp.arange(len(sizes), dtype=jnp.int32)}


def assert_trees_close(a, b, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5),
               a, b)


def assert_rounds_agree(round_a, round_b, state, rounds: int = 3,
                        sizes=(3, 0, 5, 2)):
  """Runs two round functions from `state` over the same cohorts (clients
  with `sizes` examples, padded to 5); states and metrics agree after every
  round."""
  a = b = state
  for r in range(rounds):
    cohort = make_cohort(list(sizes), max_examples=5, seed=r)
    a, metrics_a = round_a(a, cohort)
    b, metrics_b = round_b(b, cohort)
    assert_trees_close(a.params, b.params)
    assert_trees_close(a.client_states, b.client_states)
    assert_trees_close(metrics_a, metrics_b)


def test_fedavg_one_client_one_step_is_centralised_sgd():
  lr = 0.1
  client = algorithms.ClientSpec(optax.sgd(lr), local_epochs=1, batch_size=None)
  server = algorithms.ServerSpec(optax.sgd(1.0))
  state = make_state(server)
  cohort = make_cohort([7])
  new_state, _ = jax.jit(algorithms.make_round(linear_losses, client, server))(
      state, cohort)

  grads = jax.grad(mean_loss)(state.params, cohort["examples"][0])
  expected = optax.apply_updates(state.params, jax.tree.map(lambda g: -lr * g,
                                                            grads))
  assert_trees_close(new_state.params, expected)
  assert int(new_state.step) == 1


def test_fedsgd_is_a_full_batch_gradient_step():
  fed = _fed_config(algorithm="fedsgd", server_learning_rate=0.3)
  client, server = algorithms.specs_from_config(fed)
  state = make_state(server)
  sizes = [5, 2, 9, 1]
  cohort = make_cohort(sizes)
  new_state, _ = jax.jit(algorithms.make_round(linear_losses, client, server))(
      state, cohort)

  everything = jnp.concatenate([cohort["examples"][c, :n]
                                for c, n in enumerate(sizes)])
  grads = jax.grad(mean_loss)(state.params, everything)
  expected = jax.tree.map(lambda p, g: p - 0.3 * g, state.params, grads)
  assert_trees_close(new_state.params, expected)


def test_padding_does_not_change_a_clients_update():
  client = algorithms.ClientSpec(optax.adam(0.05), local_epochs=3, batch_size=2,
                                 terms=(algorithms.proximal_term(0.1),))
  update = jax.jit(algorithms.make_client_update(linear_losses, client))
  state = make_state(algorithms.ServerSpec(optax.sgd(1.0)))
  narrow = make_cohort([5], max_examples=5)
  wide = make_cohort([5], max_examples=12)
  np.testing.assert_array_equal(narrow["examples"][0], wide["examples"][0, :5])
  key = jax.random.PRNGKey(3)
  delta_narrow, _, metrics_narrow = update(state.params, (), narrow["examples"][0],
                                           5, key)
  delta_wide, _, metrics_wide = update(state.params, (), wide["examples"][0], 5, key)
  assert_trees_close(delta_narrow, delta_wide)
  assert int(metrics_narrow["steps"]) == int(metrics_wide["steps"]) == 9
  assert float(optax.tree.norm(delta_narrow)) > 0


def test_local_batches_visit_every_real_example_once_per_epoch():
  indices, mask = algorithms.local_batch_indices(jax.random.PRNGKey(0), 5, 8, 2, 3)
  assert indices.shape == mask.shape == (6, 3)  # 2 epochs x ceil(8 / 3) steps
  for epoch in np.split(np.asarray(indices)[np.asarray(mask)], 2):
    assert sorted(epoch.tolist()) == [0, 1, 2, 3, 4]


def _round_with(dropout_rate=0.0, weighting="examples"):
  client = algorithms.ClientSpec(optax.sgd(0.1), local_epochs=2, batch_size=2)
  server = algorithms.ServerSpec(optax.sgd(1.0), weighting=weighting,
                                 dropout_rate=dropout_rate)
  return jax.jit(algorithms.make_round(linear_losses, client, server))


def test_zero_example_clients_contribute_nothing():
  state = make_state(algorithms.ServerSpec(optax.sgd(1.0)))
  with_empty = make_cohort([4, 0, 3], max_examples=4)
  without = {k: v[jnp.array([0, 2])] for k, v in with_empty.items()}
  for weighting in ("examples", "uniform"):
    a, metrics = _round_with(weighting=weighting)(state, with_empty)
    b, _ = _round_with(weighting=weighting)(state, without)
    assert_trees_close(a.params, b.params)
    assert float(metrics["clients_completed"]) == 2


def test_nonfinite_clients_are_dropped_and_counted():
  """A weight-0 client with a NaN update (0 x NaN is NaN in a weighted sum)
  and a client whose data makes its update NaN both leave the server as if
  they were not in the cohort; the second is counted."""
  state = make_state(algorithms.ServerSpec(optax.sgd(1.0)))
  cohort = make_cohort([4, 0, 3, 2], max_examples=4)
  examples = np.array(cohort["examples"])
  examples[1] = np.nan  # the empty client's padding
  examples[3, 0, 0] = np.nan  # a real example
  broken = {**cohort, "examples": jnp.asarray(examples)}
  clean = {k: v[jnp.array([0, 2])] for k, v in cohort.items()}
  for round_fn in (_round_with(), _round_with(weighting="uniform")):
    new_state, metrics = round_fn(state, broken)
    reference, _ = round_fn(state, clean)
    assert np.isfinite(np.asarray(new_state.params["w"])).all()
    assert_trees_close(new_state.params, reference.params)
    assert float(metrics["nonfinite_clients"]) == 1
    assert float(metrics["clients_completed"]) == 2
    assert np.isfinite(float(metrics["client_loss"]))


def test_dropped_clients_contribute_nothing():
  state = make_state(algorithms.ServerSpec(optax.sgd(1.0)))
  cohort = make_cohort([3, 4, 2, 5, 1, 6], max_examples=6)
  completed = np.asarray(algorithms.completed_mask(state, 6, 0.5)).astype(bool)
  assert 0 < completed.sum() < 6  # this seed drops some and keeps some
  dropped_round, metrics = _round_with(dropout_rate=0.5)(state, cohort)
  kept = {k: v[np.nonzero(completed)[0]] for k, v in cohort.items()}
  survivors_round, _ = _round_with()(state, kept)
  assert_trees_close(dropped_round.params, survivors_round.params)
  assert float(metrics["clients_completed"]) == completed.sum()


def test_a_round_where_everyone_drops_out_changes_nothing():
  server = algorithms.ServerSpec(optax.adam(0.1), dropout_rate=0.999)
  client = algorithms.ClientSpec(optax.sgd(0.1), batch_size=2)
  state = make_state(server)
  new_state, metrics = jax.jit(algorithms.make_round(linear_losses, client, server))(
      state, make_cohort([3, 2]))
  assert_trees_close(new_state.params, state.params, atol=0)
  assert_trees_close(new_state.opt_state, state.opt_state, atol=0)
  assert int(new_state.step) == 1
  assert float(metrics["clients_completed"]) == 0
  assert np.isfinite(float(metrics["client_loss"]))


@pytest.mark.parametrize("algorithm", ["fedprox", "fedyogi"])
def test_vmapped_round_equals_looped_round(algorithm):
  fed = _fed_config(algorithm=algorithm, prox_mu=0.05, client_optimizer="adam",
                    client_learning_rate=0.05, local_epochs=2, client_batch_size=2,
                    dropout_rate=0.3)
  client, server = algorithms.specs_from_config(fed)
  assert_rounds_agree(jax.jit(algorithms.make_round(linear_losses, client, server)),
                      algorithms.make_looped_round(linear_losses, client, server),
                      make_state(server))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="config.federated.algorithm='fedfoo'"):
    algorithms.specs_from_config(_fed_config(algorithm="fedfoo"))
  with pytest.raises(ValueError, match="prox_mu"):
    algorithms.specs_from_config(_fed_config(algorithm="fedprox", prox_mu=0.0))
  with pytest.raises(ValueError, match="dropout_rate"):
    algorithms.specs_from_config(_fed_config(dropout_rate=1.0))
  with pytest.raises(ValueError, match="weighting"):
    algorithms.specs_from_config(_fed_config(weighting="median"))


def _fed_config(**overrides):
  from configs import fedavg
  fed = fedavg.get_config().federated
  fed.update(overrides)
  return fed


def _sharded_rounds(config, mesh, dataset, client, server, rounds=2):
  """Runs `rounds` rounds of the federated workflow's round on `mesh`."""
  from data import sources
  from federated import tasks, workflow
  task = tasks.from_config(config, sources.load_timelines(config.data, quiet=True))
  state, shardings = workflow.init_state(task, client, server, config.seed,
                                         len(dataset), mesh)
  round_fn = jax.jit(algorithms.make_round(task.example_loss, client, server),
                     in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                     out_shardings=(shardings, None))
  sampler = clients.CohortSampler(dataset, config.federated.clients_per_round,
                                  config.seed)
  for r in range(rounds):
    state, metrics = round_fn(state, mesh_lib.put_batch(sampler(r), mesh))
  return state, metrics, shardings


def _counting_client(client):
  """`client` with a per-client state: rounds completed and the last loss."""
  import dataclasses
  return dataclasses.replace(
      client, state_init=lambda params: {"rounds": jnp.zeros((), jnp.int32),
                                         "loss": jnp.zeros(())},
      state_update=lambda state, before, after, metrics: {
          "rounds": state["rounds"] + 1, "loss": metrics["loss"]})


@pytest.mark.parametrize("personalisation", ["none", "fellrec", "dp"])
def test_sharded_round_equals_single_device_round(personalisation):
  """"dp": DP-FedAvg's clipped, noised sum with dropouts; its noise is drawn
  the same whatever the sharding."""
  from configs import dp_fedavg, fedavg
  from data import sources
  from federated import privacy
  config = (dp_fedavg if personalisation == "dp" else fedavg).get_config("tiny")
  config.federated.update(dropout_rate=0.2, local_epochs=2,
                          personalisation="fellrec" if personalisation == "fellrec"
                          else "none")
  timelines = sources.load_timelines(config.data, quiet=True)
  _, dataset = clients.build_clients(
      config.federated, timelines, lambda train: sequences.training_windows_by_user(
          train, config.data.max_len), config.seed)
  budget = (privacy.budget(config.federated, len(dataset), 2)
            if personalisation == "dp" else None)
  client, server = algorithms.specs_from_config(config.federated, budget)
  if personalisation != "fellrec":
    client = _counting_client(client)

  config.mesh.update(data=1, model=1)
  single, metrics_1, _ = _sharded_rounds(
      config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]), dataset,
      client, server)
  config.mesh.update(data=4, model=2)
  sharded, metrics_8, shardings = _sharded_rounds(
      config, mesh_lib.make_mesh(config.mesh), dataset, client, server)
  embed = sharded.params["item_embed"]["embedding"]
  assert len(embed.sharding.device_set) == 8
  assert_trees_close(single.params, sharded.params, atol=2e-5)
  assert_trees_close(metrics_1, metrics_8, atol=2e-5)
  rows = len(dataset)  # the tables are padded to a multiple of the data axis
  if personalisation == "fellrec":  # one model per client, split over clients
    table = shardings.client_states["params"]["item_embed"]["embedding"]
    assert table.spec[0] == "data"
    assert_trees_close(jax.tree.map(lambda t: t[:rows], single.client_states),
                       jax.tree.map(lambda t: t[:rows], sharded.client_states),
                       atol=2e-5)
    assert 0 < int(sharded.client_states["trained"].sum()) <= 16
    return
  assert shardings.client_states["rounds"].spec[0] == "data"  # the table is split
  np.testing.assert_array_equal(single.client_states["rounds"][:rows],
                                sharded.client_states["rounds"][:rows])
  # two rounds of 8 clients, some dropping out: at most 16 participations
  assert 0 < int(sharded.client_states["rounds"].sum()) <= 16


def test_client_state_persists_across_rounds_for_the_clients_that_finish():
  client = _counting_client(algorithms.ClientSpec(optax.sgd(0.1), batch_size=2))
  server = algorithms.ServerSpec(optax.sgd(1.0), dropout_rate=0.5)
  round_fn = jax.jit(algorithms.make_round(linear_losses, client, server))
  looped = algorithms.make_looped_round(linear_losses, client, server)
  state = state_l = make_state(server, client=client, num_clients=8)
  expected = np.zeros(8, int)
  for r in range(3):
    cohort = make_cohort([2, 3, 1, 2], seed=r)
    cohort["client_rows"] = jnp.array([r, r + 1, r + 3, 7], jnp.int32)
    completed = np.asarray(algorithms.completed_mask(state, 4, 0.5)).astype(bool)
    expected[np.asarray(cohort["client_rows"])[completed]] += 1
    state, _ = round_fn(state, cohort)
    state_l, _ = looped(state_l, cohort)
  np.testing.assert_array_equal(state.client_states["rounds"], expected)
  assert_trees_close(state.client_states, state_l.client_states)
  assert expected.sum() > 0 and (expected == 0).any()


def test_mean_aggregator_is_the_weighted_mean():
  from federated import aggregators
  deltas = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]])}
  aggregate, state, _ = aggregators.mean().apply((), deltas,
                                                 jnp.array([1.0, 3.0, 0.0]), None)
  np.testing.assert_allclose(aggregate["w"], [2.5, 5.0])
  zero, _, _ = aggregators.mean().apply((), deltas, jnp.zeros(3), None)
  np.testing.assert_allclose(zero["w"], [0.0, 0.0])


def test_server_loss_gradient_joins_the_pseudo_gradient():
  """x <- x - lr * (-aggregate + grad f_c(x)) with f_c = |x - target|^2 / 2."""
  target = {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array(-1.0)}
  server_loss = lambda params, batch, rng: 0.5 * optax.tree.norm(  # noqa: E731
      optax.tree.sub(params, batch), squared=True)
  client = algorithms.ClientSpec(optax.sgd(0.1), batch_size=2)
  plain = algorithms.ServerSpec(optax.sgd(0.5))
  mixed = algorithms.ServerSpec(optax.sgd(0.5), server_loss=server_loss)
  state = make_state(plain)
  cohort = make_cohort([3, 2])
  after_plain, _ = jax.jit(algorithms.make_round(linear_losses, client, plain))(
      state, cohort)
  after_mixed, metrics = jax.jit(algorithms.make_round(linear_losses, client, mixed))(
      state, {**cohort, "server_batch": target})
  expected = jax.tree.map(lambda p, x, t: p - 0.5 * (x - t), after_plain.params,
                          state.params, target)
  assert_trees_close(after_mixed.params, expected)
  assert float(metrics["server_loss"]) == pytest.approx(float(server_loss(
      state.params, target, None)))
  # with no client contributing, the server term alone still moves the model
  everyone_drops = algorithms.ServerSpec(optax.sgd(0.5), server_loss=server_loss,
                                         dropout_rate=0.999)
  alone, _ = jax.jit(algorithms.make_round(linear_losses, client, everyone_drops))(
      state, {**cohort, "server_batch": target})
  assert_trees_close(alone.params, jax.tree.map(
      lambda x, t: x - 0.5 * (x - t), state.params, target))


def test_server_learning_rate_defaults_by_algorithm():
  grads = {"w": jnp.ones(2)}
  for algorithm, expected in (("fedavg", -1.0), ("fedavgm", -1.0)):
    _, server = algorithms.specs_from_config(_fed_config(algorithm=algorithm))
    updates, _ = server.optimizer.update(grads, server.optimizer.init(grads))
    np.testing.assert_allclose(updates["w"], expected)
  _, server = algorithms.specs_from_config(_fed_config(
      algorithm="fedavg", server_learning_rate=0.25))
  updates, _ = server.optimizer.update(grads, server.optimizer.init(grads))
  np.testing.assert_allclose(updates["w"], -0.25)


@pytest.mark.parametrize("chunk", [2, 3])
def test_chunked_round_equals_the_vmapped_round(chunk):
  """Clients trained `chunk` at a time (the last chunk short for 3) give the
  same round as the whole cohort vmapped at once."""
  client = _counting_client(algorithms.ClientSpec(optax.sgd(0.1), batch_size=2,
                                                  local_epochs=2))
  server = algorithms.ServerSpec(optax.adam(0.05), dropout_rate=0.3)
  assert_rounds_agree(
      jax.jit(algorithms.make_round(linear_losses, client, server)),
      jax.jit(algorithms.make_round(linear_losses, client, server,
                                    client_chunk=chunk)),
      make_state(server, client=client), rounds=2)
  with pytest.raises(ValueError, match="client_chunk=-1"):
    algorithms.make_round(linear_losses, client, server, client_chunk=-1)


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunks_across_data_shards_equal_the_single_device_round(chunk):
  """With 8 clients split over 4 data shards, every lax.map step takes
  `chunk` clients from each shard (3: fewer than a shard holds); the sharded,
  chunked round equals the whole cohort vmapped on one device, per-client
  states included (they come back in cohort order)."""
  import ml_collections
  from jax.sharding import NamedSharding, PartitionSpec as P
  client = _counting_client(algorithms.ClientSpec(optax.sgd(0.1), batch_size=2,
                                                  local_epochs=2))
  server = algorithms.ServerSpec(optax.adam(0.05), dropout_rate=0.3)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
  replicated = NamedSharding(mesh, P())
  sharded = jax.jit(algorithms.make_round(linear_losses, client, server,
                                          client_chunk=chunk, client_shards=4),
                    in_shardings=(replicated, mesh_lib.batch_sharding(mesh)),
                    out_shardings=(replicated, None))
  assert_rounds_agree(
      jax.jit(algorithms.make_round(linear_losses, client, server)), sharded,
      make_state(server, client=client), rounds=2, sizes=(3, 0, 5, 2, 1, 4, 5, 2))
  with pytest.raises(ValueError, match="do not split over the mesh's 3"):
    jax.eval_shape(algorithms.make_round(linear_losses, client, server,
                                         client_chunk=1, client_shards=3),
                   make_state(server, client=client), make_cohort([1, 2, 3, 4]))


def test_client_chunk_auto_shares_the_cpu_chunk_over_the_data_shards():
  """-1 picks the measured CPU chunk on one CPU device and shares it over a
  mesh's data shards (at least 1 each); explicit values pass through; below
  -1 is refused."""
  import ml_collections
  from federated import workflow
  from infra.errors import ConfigError
  one = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "model": 1}),
                           jax.devices()[:1])
  four = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
  eight = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}))
  assert workflow.resolve_client_chunk(-1, one) == workflow.CPU_CLIENT_CHUNK
  assert workflow.resolve_client_chunk(-1, four) == workflow.CPU_CLIENT_CHUNK // 4
  assert workflow.resolve_client_chunk(-1, eight) == 1
  assert workflow.resolve_client_chunk(0, one) == 0
  assert workflow.resolve_client_chunk(32, eight) == 32
  with pytest.raises(ConfigError, match="client_chunk=-2"):
    workflow.resolve_client_chunk(-2, one)
