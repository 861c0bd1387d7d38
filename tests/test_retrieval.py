"""Federated retrieval (userllm/models/dual_encoder.py, federated/tasks.RetrievalTask):
the losses on fixed similarity matrices, Global and Batch Recall@K on
hand-made cases, the examples, pooling (central, IID), the rows a client
reads, and the retrieval round with the global spreadout at the server
(mixed FL): vmapped == looped, sharded == single device, and bad config
values as one-line errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from federated import algorithms, clients, runs, tasks, workflow
from infra import mesh as mesh_lib
from infra.errors import ConfigError
from test_federated_algorithms import assert_trees_close
from userllm.models import dual_encoder as de


def unit(rows):
  rows = np.asarray(rows, np.float64)
  return jnp.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), jnp.float32)


CONTEXT = unit([[1, 0], [0, 1], [1, 1]])
LABEL = unit([[1, 0.2], [0.3, 1], [-1, 1]])
IDS = jnp.asarray([3, 1, 2])
TABLE = unit([[1, 1], [0.3, 1], [-1, 1], [1, 0.2]])  # row 0 is padding


def cfg(loss, scale=2.0, **spreadout):
  return de.DualEncoderConfig(vocab=4, loss=loss, logit_scale=scale,
                              spreadout=tuple(spreadout.items()))


def test_batch_softmax_and_hinge_on_a_fixed_similarity_matrix():
  sims = np.asarray(CONTEXT) @ np.asarray(LABEL).T
  logits = 2.0 * sims
  expected = -np.diagonal(logits - np.log(np.exp(logits).sum(1, keepdims=True)))
  np.testing.assert_allclose(de.example_losses(cfg("batch_softmax"), CONTEXT, LABEL,
                                               IDS, TABLE), expected, rtol=1e-5)
  hinge = np.maximum(0.9 - np.diagonal(sims), 0.0) ** 2
  np.testing.assert_allclose(de.example_losses(cfg("hinge"), CONTEXT, LABEL, IDS,
                                               TABLE), hinge, rtol=1e-5, atol=1e-7)


def test_global_softmax_ranks_against_every_item_but_padding():
  logits = 2.0 * np.asarray(CONTEXT) @ np.asarray(TABLE).T
  logits = logits[:, 1:]  # padding is nobody's candidate
  ids = np.asarray(IDS) - 1
  expected = -(logits[np.arange(3), ids] - np.log(np.exp(logits).sum(1)))
  np.testing.assert_allclose(de.example_losses(cfg("global_softmax"), CONTEXT,
                                               LABEL, IDS, TABLE), expected, rtol=1e-5)


def test_spreadouts_are_off_diagonal_frobenius_norms_added_once_per_batch():
  c, l_ = np.asarray(CONTEXT), np.asarray(LABEL)

  def off(m):
    return np.sqrt(np.sum(m ** 2) - np.sum(np.diagonal(m) ** 2))

  base = np.asarray(de.example_losses(cfg("hinge"), CONTEXT, LABEL, IDS, TABLE))
  for name, matrix in (("context", c @ c.T), ("label", l_ @ l_.T),
                       ("cross", c @ l_.T)):
    with_term = de.example_losses(cfg("hinge", **{name: 0.5}), CONTEXT, LABEL, IDS,
                                  TABLE)
    np.testing.assert_allclose(np.asarray(with_term) - base, 0.5 * off(matrix),
                               rtol=1e-5, err_msg=name)
  items = np.asarray(TABLE)[1:]
  np.testing.assert_allclose(de.global_spreadout(TABLE), off(items @ items.T),
                             rtol=1e-5)


def test_padding_rows_cost_nothing_and_are_nobodys_negative():
  ids = jnp.asarray([3, 1, 0])
  losses = de.example_losses(cfg("batch_softmax", label=1.0), CONTEXT, LABEL, ids,
                             TABLE)
  assert float(losses[2]) == 0.0
  two = de.example_losses(cfg("batch_softmax", label=1.0), CONTEXT[:2], LABEL[:2],
                          ids[:2], TABLE)
  np.testing.assert_allclose(losses[:2], two, rtol=1e-6)


def test_global_and_batch_recall_on_hand_made_cases():
  # items 1..4 on the unit circle; the context reads one item; an identity
  # dense layer makes the context that item's own direction
  angles = np.deg2rad([0, 0, 40, 100, 170])  # row 0 padding
  embedding = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
  model = de.DualEncoder(de.DualEncoderConfig(vocab=5, embed_dim=2, context_len=2))
  params = {"item_embed": {"embedding": jnp.asarray(embedding)},
            "context_dense": {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}}
  rank_fn = de.make_rank_fn(model)
  inputs = jnp.asarray([[1, 0], [1, 0], [1, 0]])  # history: item 1 (excluded)
  excluded = jnp.zeros((3, 5), bool).at[:, 1].set(True)
  ranks = rank_fn(params, inputs, jnp.ones(3, jnp.int32), jnp.asarray([2, 3, 4]),
                  excluded)
  np.testing.assert_array_equal(ranks, [0, 1, 2])  # by angle from item 1
  context = np.asarray([[1.0, 0.0], [1.0, 0.0]])
  label = np.asarray([[1.0, 0.0], [0.0, 1.0]])  # row 1's own label is not its best
  assert de.batch_recall(context, label, 1) == 0.5
  assert de.batch_recall(context, label, 2) == 1.0


def test_contexts_are_the_last_items_before_each_event():
  rows, users = de.context_examples_by_user(
      lambda u: [np.asarray([5, 6, 7, 8]), np.asarray([9])][u], 2, context_len=2)
  np.testing.assert_array_equal(rows, [[5, 0, 6], [5, 6, 7], [6, 7, 8]])
  np.testing.assert_array_equal(users, [0, 0, 0])
  last = de._last_items(jnp.asarray([[1, 2, 3, 0], [4, 0, 0, 0]]), 2)
  np.testing.assert_array_equal(last, [[2, 3], [4, 0]])


def test_pooling_deals_the_same_examples_iid_or_to_one_central_client():
  owners = np.asarray([0, 0, 0, 1, 2, 2])
  same, ids = clients.pool_examples("none", owners, np.asarray([0, 1, 2]), 0)
  np.testing.assert_array_equal(same, owners)
  dealt, ids = clients.pool_examples("iid", owners, np.asarray([0, 1, 2]), 0)
  np.testing.assert_array_equal(np.bincount(dealt), np.bincount(owners))
  assert not np.array_equal(dealt, owners)
  central, ids = clients.pool_examples("central", owners, np.asarray([4, 7]), 0)
  assert set(central) == {4} and list(ids) == [4]
  with pytest.raises(ConfigError, match="config.federated.pooling='mixed'"):
    clients.pool_examples("mixed", owners, np.asarray([0]), 0)


def tiny_retrieval(**retrieval):
  from configs import retrieval as retrieval_config
  config = retrieval_config.get_config("tiny")
  config.retrieval.update(retrieval)
  return config


def test_a_client_reads_and_changes_only_its_own_items_rows():
  from data import sources
  config = tiny_retrieval()
  timelines = sources.load_timelines(config.data, quiet=True)
  task = tasks.from_config(config, timelines)
  _, dataset = clients.build_clients(config.federated, timelines,
                                     task.client_examples, config.seed)
  client, _ = algorithms.specs_from_config(config.federated)
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                        task.init_params(jax.random.PRNGKey(0)),
                        is_leaf=lambda x: hasattr(x, "value"))
  update = jax.jit(algorithms.make_client_update(task.example_loss, client))
  examples, count = dataset.examples[0], int(dataset.num_examples[0])
  delta, _, _ = update(params, (), examples, count, jax.random.PRNGKey(1))
  changed = np.nonzero(np.abs(np.asarray(delta["item_embed"]["embedding"])).sum(1))[0]
  read = np.unique(examples[:count])
  assert set(changed) <= set(read[read > 0])
  assert task.rows_read(examples[:count]) == len(read[read > 0])
  dense = tasks.from_config(tiny_retrieval(spreadout={"table": 0.1}), timelines)
  assert dense.rows_read(examples[:count]) is None


def _retrieval_rounds(config, mesh, rounds=2):
  """`rounds` rounds of the retrieval workflow's jitted round on `mesh`."""
  f = workflow.build(config, mesh)
  state, shardings = workflow.init_state(f.task, f.client_spec, f.server_spec,
                                         config.seed, len(f.dataset), mesh)
  round_fn = jax.jit(algorithms.make_round(f.task.example_loss, f.client_spec,
                                           f.server_spec),
                     in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                     out_shardings=(shardings, None))
  cohorts = runs.cohorts(config, f)
  for r in range(rounds):
    state, metrics = round_fn(state, mesh_lib.put_batch(cohorts(r), mesh))
  return f, state, metrics


@pytest.fixture(scope="module")
def server_spreadout_config():
  config = tiny_retrieval(loss="hinge", spreadout={"label": 0.5})
  config.federated.mixed.update(server_loss="global_spreadout", weight=0.2,
                                algorithm="parallel", central_steps=2,
                                central_learning_rate=0.5)
  config.federated.local_epochs = 2
  return config


def test_server_spreadout_round_sharded_equals_single_device(server_spreadout_config):
  config = server_spreadout_config
  config.mesh.update(data=1, model=1)
  _, single, metrics_1 = _retrieval_rounds(
      config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
  config.mesh.update(data=8, model=1)
  _, sharded, metrics_8 = _retrieval_rounds(config, mesh_lib.make_mesh(config.mesh))
  assert len(sharded.params["item_embed"]["embedding"].sharding.device_set) >= 1
  assert_trees_close(single.params, sharded.params, atol=2e-5)
  assert_trees_close(metrics_1, metrics_8, atol=2e-5)
  assert float(metrics_1["server_loss"]) > 0


@pytest.mark.parametrize("mixing", ["parallel", "one_way"])
def test_server_spreadout_round_vmapped_equals_looped(server_spreadout_config, mixing):
  config = server_spreadout_config
  config.mesh.update(data=1, model=1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  f = workflow.build(config, mesh)
  server = dataclasses.replace(f.server_spec, mixing=mixing)
  state, _ = workflow.init_state(f.task, f.client_spec, server, config.seed,
                                 len(f.dataset), mesh)
  state = state.replace(params=jax.tree.map(
      lambda x: x.value if hasattr(x, "value") else x, state.params,
      is_leaf=lambda x: hasattr(x, "value")))
  vmapped = jax.jit(algorithms.make_round(f.task.example_loss, f.client_spec, server))
  looped = algorithms.make_looped_round(f.task.example_loss, f.client_spec, server)
  cohort = runs.cohorts(config, f)(0)
  a, metrics_a = vmapped(state, cohort)
  b, metrics_b = looped(state, cohort)
  assert_trees_close(a.params, b.params, atol=2e-5)
  assert_trees_close(metrics_a, metrics_b, atol=2e-5)


@pytest.mark.parametrize("field,value,message", [
    ("retrieval.loss", "triplet", "config.retrieval.loss='triplet'"),
    ("retrieval.spreadout.label", -1.0, "config.retrieval.spreadout.label=-1.0"),
    ("federated.mixed.server_loss", "l2", "config.federated.mixed.server_loss='l2'"),
    ("federated.mixed.algorithm", "three_way",
     "config.federated.mixed.algorithm='three_way'"),
    ("federated.pooling", "mixed", "config.federated.pooling='mixed'"),
])
def test_bad_retrieval_config_values_are_config_errors(field, value, message):
  config = tiny_retrieval()
  section, name = field.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  mesh = mesh_lib.make_mesh(config.mesh)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    workflow.build(config, mesh)


def test_round_cost_counts_only_the_rows_a_client_reads():
  from federated import cost
  config = tiny_retrieval()
  config.mesh.update(data=1, model=1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  f = workflow.build(config, mesh)
  state, _ = workflow.init_state(f.task, f.client_spec, f.server_spec, config.seed,
                                 len(f.dataset), mesh)
  sparse = cost.round_cost(f.task, f.client_spec, state, f.dataset)
  table = config.retrieval.embed_dim * 4 * (f.timelines.num_items + 1)
  dense = sparse["model_bytes"] - table
  rows = [len(set(np.unique(e[:n])) - {0}) for e, n in
          zip(f.dataset.examples, f.dataset.num_examples)]
  expected = dense + config.retrieval.embed_dim * 4 * np.mean(rows)
  assert sparse["client_bytes_down"] == pytest.approx(expected)
  assert sparse["client_bytes_up"] < sparse["model_bytes"]
  assert sparse["client_flops"] > 0
  config.retrieval.spreadout.table = 0.1  # reads every row
  g = workflow.build(config, mesh)
  everything = cost.round_cost(g.task, g.client_spec, state, g.dataset)
  assert everything["client_bytes_down"] == pytest.approx(everything["model_bytes"])
  assert everything["client_flops"] > sparse["client_flops"]
