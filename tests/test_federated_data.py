"""Client data: participation split, packing, cohort sampling, client synthesis,
participation-gap summaries, and the federated workflow end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest

from infra.errors import ConfigError, Preempted
from conftest import ML100K_DIR, REPO, run_workflow
from data import movielens, sequences
from data import timelines as tl
from federated import clients, evaluation, partition


def test_participation_split_holds_out_last_events(tiny_timelines):
  data = tiny_timelines
  split = clients.participation_split(data, np.arange(data.num_users), 0.75, 0.25,
                                      seed=0)
  assert split.participating.sum() == 48
  for user in range(data.num_users):
    items, n = data.user_items(user), data.lengths[user]
    k = max(1, round(0.25 * n))
    if split.participating[user]:
      np.testing.assert_array_equal(split.train.user_items(user), items[:n - k])
      rows = split.out_of_sample.users == user
      np.testing.assert_array_equal(split.out_of_sample.targets[rows], items[n - k:])
      np.testing.assert_array_equal(split.out_of_sample.history_lengths[rows],
                                    np.arange(n - k, n))
      in_rows = split.in_sample.history_lengths[split.in_sample.users == user]
      np.testing.assert_array_equal(in_rows, np.arange(max(n - 2 * k, 1), n - k))
      assert not (split.non_participating.users == user).any()
    else:
      assert len(split.train.user_items(user)) == 0  # never trains
      rows = split.non_participating.users == user
      np.testing.assert_array_equal(split.non_participating.targets[rows],
                                    items[n - k:])


def test_evaluating_a_sample_of_clients_keeps_their_rows_and_the_training(
    tiny_timelines):
  """eval_clients: at most that many clients per side are scored, each with
  all its rows (in and out of sample paired); training data unchanged."""
  data = tiny_timelines
  owners = np.arange(data.num_users) // 2  # 32 clients of 2 users
  every = clients.participation_split(data, owners, 0.75, 0.25, seed=0)
  sample = clients.participation_split(data, owners, 0.75, 0.25, seed=0,
                                       eval_clients=5)
  np.testing.assert_array_equal(sample.train.item_ids, every.train.item_ids)
  np.testing.assert_array_equal(sample.participating, every.participating)
  for name in ("in_sample", "out_of_sample", "non_participating"):
    full, kept = getattr(every, name), getattr(sample, name)
    chosen = np.unique(owners[kept.users])
    assert len(chosen) == 5
    rows = np.isin(owners[full.users], chosen)  # every row of a chosen client
    np.testing.assert_array_equal(kept.targets, full.targets[rows])
  np.testing.assert_array_equal(np.unique(sample.in_sample.users),
                                np.unique(sample.out_of_sample.users))
  with pytest.raises(ConfigError, match="config.federated.eval_clients=-1"):
    clients.participation_split(data, owners, 0.75, 0.25, seed=0, eval_clients=-1)


def test_pack_clients_pads_masks_and_caps():
  examples = np.arange(1, 8)[:, None] * np.ones((1, 2), np.int32)  # rows 1..7
  owners = np.array([2, 0, 2, 2, 0, 2, 2])
  packed = clients.pack_clients(examples, owners, np.array([0, 1, 2]))
  assert packed.examples.shape == (3, 5, 2)
  np.testing.assert_array_equal(packed.num_examples, [2, 0, 5])
  np.testing.assert_array_equal(packed.examples[0, :2, 0], [2, 5])
  np.testing.assert_array_equal(packed.examples[2, :, 0], [1, 3, 4, 6, 7])
  assert not packed.examples[0, 2:].any() and not packed.examples[1].any()

  capped = clients.pack_clients(examples, owners, np.array([0, 2]), max_examples=3)
  np.testing.assert_array_equal(capped.num_examples, [2, 3])
  np.testing.assert_array_equal(capped.examples[1, :, 0], [4, 6, 7])  # latest
  assert capped.num_capped == 2
  reordered = clients.pack_clients(examples, owners, np.array([2, 0]))  # rows in the given order
  np.testing.assert_array_equal(reordered.examples, packed.examples[[2, 0]])
  np.testing.assert_array_equal(reordered.num_examples, [5, 2])


def test_cohort_sampler_is_a_pure_function_of_the_round():
  packed = clients.pack_clients(np.ones((40, 1)), np.arange(40) % 20,
                                np.arange(20))
  sampler = clients.CohortSampler(packed, 8, seed=1)
  first = sampler(5)["client_ids"]
  assert len(set(first.tolist())) == 8
  np.testing.assert_array_equal(first, clients.CohortSampler(packed, 8, 1)(5)
                                ["client_ids"])
  assert not np.array_equal(first, sampler(6)["client_ids"])
  with pytest.raises(ValueError, match="clients_per_round=21"):
    clients.CohortSampler(packed, 21, seed=1)


def _assert_covers_each_example_once(assignment, n, num_clients):
  assert assignment.shape == (n,)
  assert assignment.min() >= 0 and assignment.max() < num_clients
  members = np.concatenate([np.nonzero(assignment == c)[0]
                            for c in range(num_clients)])
  np.testing.assert_array_equal(np.sort(members), np.arange(n))


def test_dirichlet_partition_is_deterministic_and_covers_everything():
  labels = np.random.default_rng(0).integers(0, 5, size=500)
  a = partition.dirichlet_partition(labels, 20, 0.3, seed=4)
  _assert_covers_each_example_once(a, 500, 20)
  np.testing.assert_array_equal(a, partition.dirichlet_partition(labels, 20, 0.3, 4))
  assert not np.array_equal(a, partition.dirichlet_partition(labels, 20, 0.3, 5))
  # Small alpha: label skew, each client dominated by few labels.
  top_share = [np.bincount(labels[a == c]).max() / max((a == c).sum(), 1)
               for c in range(20) if (a == c).any()]
  assert np.mean(top_share) > 0.5


def test_the_modulo_partition_makes_each_synthetic_community_a_client(
    tiny_timelines):
  """User i in client i mod n: on synthetic data generated with n
  communities, a client's users are exactly one community's."""
  import ml_collections
  from data import synthetic
  fed = ml_collections.ConfigDict(dict(partition="modulo", num_clients=4,
                                       dirichlet_alpha=0.5, embedding_dim=8))
  clients_ = partition.client_of_user(fed, tiny_timelines, seed=0)
  spec = synthetic.SyntheticSpec(num_users=tiny_timelines.num_users, communities=4)
  np.testing.assert_array_equal(clients_, synthetic.community_of_users(spec))
  assert np.bincount(clients_).min() >= tiny_timelines.num_users // 4
  fed.num_clients = tiny_timelines.num_users + 1
  with pytest.raises(ConfigError, match="num_clients"):
    partition.client_of_user(fed, tiny_timelines, seed=0)


def test_semantic_partition_is_deterministic_and_groups_similar_examples():
  rng = np.random.default_rng(0)
  # Two labels; within each label, three well-separated styles.
  styles = rng.integers(0, 3, size=300)
  labels = rng.integers(0, 2, size=300)
  embeddings = styles[:, None] * 10.0 + rng.normal(size=(300, 4))
  a = partition.semantic_partition(embeddings, labels, 3, seed=0)
  _assert_covers_each_example_once(a, 300, 3)
  np.testing.assert_array_equal(a, partition.semantic_partition(embeddings, labels,
                                                                3, seed=0))
  # Each client holds one style across both labels (intra-client similarity).
  for c in range(3):
    assert len(np.unique(styles[a == c])) == 1
    assert len(np.unique(labels[a == c])) == 2
  with pytest.raises(ValueError, match="needs a label"):
    partition.semantic_partition(embeddings[:4], labels[:4], 5, seed=0)


def test_item_and_user_embeddings_have_the_documented_shapes(tiny_timelines):
  vectors = partition.item_embeddings(tiny_timelines, 8)
  assert vectors.shape == (tiny_timelines.num_items + 1, 8)
  assert not vectors[0].any()
  users = partition.user_embeddings(tiny_timelines, vectors)
  assert users.shape == (tiny_timelines.num_users, 8) and np.isfinite(users).all()


def test_summaries_are_per_client_means():
  values = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
  owners = np.array([3, 3, 5, 5, 9])
  per_client = evaluation.per_client_means(values, owners)
  np.testing.assert_allclose(per_client, [0.5, 1.0, 0.0])
  summary = evaluation.summarize(per_client)
  assert summary["mean"] == pytest.approx(0.5)
  assert summary["p50"] == pytest.approx(0.5) and summary["p10"] == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["dirichlet", "semantic"])
def test_synthesised_clients_group_users(tiny_timelines, kind):
  from configs import fedavg
  fed = fedavg.get_config().federated
  fed.update(partition=kind, num_clients=4)
  owners = partition.client_of_user(fed, tiny_timelines, seed=0)
  assert owners.shape == (tiny_timelines.num_users,)
  assert set(owners.tolist()) == set(range(owners.max() + 1))  # dense ids


def test_movielens_100k_natural_clients():
  from configs import fedavg
  config = fedavg.get_config()
  config.data.update(source="movielens", dir=ML100K_DIR)
  data = movielens.read_movielens(ML100K_DIR)
  split, dataset = clients.build_clients(
      config.federated, data, lambda train: sequences.training_windows_by_user(
          train, config.data.max_len), config.seed)
  assert len(split.participating) == 943 and split.participating.sum() == 754
  assert len(dataset) == 754 and (dataset.num_examples >= 1).all()
  # Every participating user's training events are in its windows exactly once
  # as targets (the first event of each user is context only).
  targets = (dataset.examples[:, :, 1:] != tl.PAD_ITEM).sum()
  assert targets == split.train.num_events - 754
  assert len(split.out_of_sample) + len(split.non_participating) == sum(
      max(1, round(0.2 * n)) for n in data.lengths)


def run_main(workdir, *args):
  return subprocess.run([sys.executable, "main.py", "--config",
                         "configs/fedavg.py:tiny", "--workdir", str(workdir), *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600)


def test_federated_workflow_writes_the_participation_gap_and_resumes(tmp_path):
  from configs import fedavg
  config = fedavg.get_config("tiny")
  config.train.stop_after_steps = 3
  with pytest.raises(Preempted, match="stopped at round 3 of 6"):
    run_workflow(config, tmp_path)
  config.train.stop_after_steps = 0
  results = run_workflow(config, tmp_path)
  assert results["rounds"] == 6
  key = lambda split, metric: f"{split}/model/next_item/{metric}"  # noqa: E731
  for name in evaluation.SPLITS:
    assert 0.0 <= results[key(name, "recall@10_mean")] <= 1.0
    assert results[key(name, "recall@10_p10")] <= results[key(name, "recall@10_p90")]
    assert 0.0 <= results[f"{name}/popularity/next_item/recall@10_mean"] <= 1.0
  assert results["participation_gap/model/next_item/recall@10"] == pytest.approx(
      results[key("out_of_sample", "recall@10_mean")]
      - results[key("non_participating", "recall@10_mean")])
  # its standard error: two disjoint sets of clients, so their errors add
  assert results["participation_gap/model/next_item/recall@10_stderr"] == pytest.approx(
      np.hypot(results[key("out_of_sample", "recall@10_stderr")],
               results[key("non_participating", "recall@10_stderr")]))
  assert results["out_of_sample_gap/model/next_item/recall@10_stderr"] > 0
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "federated"] == [2, 3, 4, 6]

  straight = run_workflow(config, tmp_path / "straight")
  assert straight[key("out_of_sample", "recall@10_mean")] == pytest.approx(
      results[key("out_of_sample", "recall@10_mean")], abs=1e-6)


def test_federated_config_errors_are_one_line(tmp_path):
  result = run_main(tmp_path, "--config.federated.clients_per_round=100")
  assert result.returncode == 2
  assert "config.federated.clients_per_round=100" in result.stderr
  assert "Traceback" not in result.stderr


def test_fellrec_workflow_resumes_its_client_models_and_scores_with_them(tmp_path):
  """Per-client models are checkpointed with the server state: a run stopped
  and resumed scores exactly like a straight one, and the participating
  clients are scored with their own models (the server's model scores
  otherwise)."""
  from configs import fedavg
  from federated import workflow
  from infra import mesh as mesh_lib
  config = fedavg.get_config("tiny")
  config.federated.update(personalisation="fellrec", partition="dirichlet",
                          num_clients=10, clients_per_round=8, algorithm="fedavg")
  config.train.stop_after_steps = 3
  with pytest.raises(Preempted):
    run_workflow(config, tmp_path / "resumed")
  config.train.stop_after_steps = 0
  resumed = run_workflow(config, tmp_path / "resumed")
  straight = run_workflow(config, tmp_path / "straight")
  key = "out_of_sample/model/next_item/recall@10_mean"
  assert resumed[key] == pytest.approx(straight[key], abs=1e-6)

  mesh = mesh_lib.make_mesh(config.mesh)
  f = workflow.build(config, mesh)
  state = workflow.train(config, str(tmp_path / "straight"), mesh, f)  # restored
  personal = workflow.personal_models(state, f.dataset)
  trained = [c for c in f.dataset.client_ids if personal(int(c)) is not None]
  assert trained and personal(10**6) is None
  evaluator = evaluation.ParticipationGapEvaluator(
      f.task, f.timelines, f.split, config.train.eval_batch_size, mesh)
  same = evaluator.evaluate(state.params, lambda c: state.params)
  assert same[key] == pytest.approx(evaluator.evaluate(state.params)[key])
  assert evaluator.evaluate(state.params, personal)[key] == pytest.approx(
      straight[key], abs=1e-6)
