"""Split storage (federated/split.py) and the attacks that measure protection
(federated/attacks.py): the split forward pass is the unsplit one, the cost
counts what each side holds, and each attack separates what it should on
cases built to leak (and reads 0.5 / chance where nothing leaks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from federated import attacks, split
from userllm.models import sequence_model as sm


@pytest.fixture(scope="module")
def model_and_params():
  cfg = sm.SequenceModelConfig(vocab_size=40, max_len=6, embed_dim=16,
                               num_layers=3, num_heads=2, mlp_dim=32, dropout=0.0)
  model = sm.ItemSequenceTransformer(cfg)
  items = jnp.array([[3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), items)["params"])
  return model, params, items


@pytest.mark.parametrize("k", [0, 1, 3])
def test_split_forward_equals_the_unsplit_one(model_and_params, k):
  model, params, items = model_and_params
  full = model.apply({"params": params}, items)
  got = split.split_logits(model, params, items, k)
  np.testing.assert_allclose(np.asarray(got)[..., 1:], np.asarray(full)[..., 1:],
                             atol=1e-5)
  client, server = split.split_params(params, 3, k)
  assert set(client) | set(server) == set(params)
  assert not set(client) & set(server)
  assert {f"block_{i}" for i in range(k)} <= set(client)


def test_client_cost_counts_params_and_activations(model_and_params):
  _, params, _ = model_and_params
  costs = [split.client_cost(params, 3, k, batch_size=4, max_len=6, embed_dim=16,
                             local_steps=5) for k in range(4)]
  total = split.tree_bytes(params)
  for c in costs:
    assert c["client_param_bytes"] + c["server_param_bytes"] == total
  assert [c["client_param_bytes"] for c in costs] == sorted(
      c["client_param_bytes"] for c in costs)
  assert costs[0]["activation_bytes_per_step"] == 4 * 4 * 6 * 16 * 4
  assert costs[3]["activation_bytes_per_step"] == 0  # all on the client: plain FL
  assert costs[3]["round_bytes"] == 2 * total
  with pytest.raises(ValueError, match="k=4"):
    split.client_layer_names(3, 4)


def test_auc_reads_the_separation_and_refuses_nonfinite_scores():
  assert attacks.auc([3.0, 4.0], [1.0, 2.0]) == 1.0
  assert attacks.auc([1.0, 2.0], [1.0, 2.0]) == 0.5
  with pytest.raises(ValueError, match="not finite"):
    attacks.auc([np.nan], [1.0])


def test_embedding_update_attack_finds_the_clients_items():
  rng = np.random.default_rng(0)
  update = rng.normal(scale=0.01, size=(64, 8))
  own = np.array([3, 7, 11, 20])
  update[own] += rng.normal(scale=1.0, size=(4, 8))
  assert attacks.embedding_update_auc(update, own, num_items=50) == 1.0
  noise = rng.normal(size=(64, 8))  # an update that carries nothing
  assert abs(attacks.embedding_update_auc(noise, own, 50) - 0.5) < 0.35


def test_activation_inversion_recovers_items_from_an_invertible_map():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(30, 16))
  fit_items, test_items = rng.integers(0, 30, 600), rng.integers(0, 30, 200)
  fit_h = table[fit_items] + 0.05 * rng.normal(size=(600, 16))
  test_h = table[test_items] + 0.05 * rng.normal(size=(200, 16))
  assert attacks.activation_inversion_accuracy(fit_h, fit_items, test_h,
                                               test_items, 30) > 0.9
  blind = rng.normal(size=(200, 16))  # activations unrelated to the items
  assert attacks.activation_inversion_accuracy(fit_h, fit_items, blind,
                                               test_items, 30) < 0.2


def test_decoder_auc_ranks_the_true_item_among_the_candidates():
  """Against a count by hand: a true item above all, below all and tied
  with one other candidate; an unrelated decoder reads about 0.5."""
  scores = np.array([[0.1, 0.9, 0.2, 0.3],    # true 1: beats 3 of 3
                     [0.5, 0.1, 0.2, 0.3],    # true 1: beats 0 of 3
                     [0.2, 0.2, 0.0, 0.1]])   # true 0: 2 beaten + a tie -> 2.5
  auc, stderr = attacks.decoder_auc(scores, np.array([1, 1, 0]), np.arange(4))
  assert auc == pytest.approx((1.0 + 0.0 + 2.5 / 3) / 3)
  assert stderr > 0
  # restricted to candidates {1, 2}: position 1 beats 1 of 1, position 2 0 of 1
  sub, _ = attacks.decoder_auc(scores[:2], np.array([1, 1]), np.array([1, 2]))
  assert sub == pytest.approx(0.5)
  with pytest.raises(ValueError, match="candidate"):
    attacks.decoder_auc(scores, np.array([3, 1, 0]), np.array([0, 1, 2]))
  rng = np.random.default_rng(0)
  blind, _ = attacks.decoder_auc(rng.normal(size=(2000, 50)),
                                 rng.integers(0, 50, 2000), np.arange(50))
  assert abs(blind - 0.5) < 0.03


def test_prefix_timelines_keeps_the_first_events_of_the_chosen_users():
  from configs import fedavg
  from data import sources
  timelines = sources.load_timelines(fedavg.get_config("tiny").data, quiet=True)
  kept = attacks.prefix_timelines(timelines, np.array([0, 2]), np.array([3, 5]))
  np.testing.assert_array_equal(kept.lengths[:4], [3, 0, 5, 0])
  np.testing.assert_array_equal(kept.user_items(2), timelines.user_items(2)[:5])


def test_membership_attack_separates_an_overfit_model_and_not_a_fresh_one():
  """A model trained hard on the members only has lower loss on them."""
  import optax
  from configs import fedavg
  from data import sequences, sources
  from federated import clients, partition
  config = fedavg.get_config("tiny")
  timelines = sources.load_timelines(config.data, quiet=True)
  split_ = clients.participation_split(
      timelines, partition.client_of_user(config.federated, timelines, 0),
      0.5, 0.2, seed=0)
  cfg = sm.SequenceModelConfig(vocab_size=timelines.num_items + 1, max_len=16,
                               embed_dim=32, num_layers=1, num_heads=2,
                               mlp_dim=64, dropout=0.0)
  model = sm.ItemSequenceTransformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                    jnp.zeros((1, 16), jnp.int32))["params"])
  fresh = attacks.membership_auc(model, params, timelines, split_, 16)
  assert abs(fresh["mia_auc"] - 0.5) < 0.2 and fresh["mia_nonmembers"] > 0
  windows, _ = sequences.training_windows_by_user(split_.train, 16)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: sm.next_item_loss(
        model, p, jnp.asarray(windows), jax.random.PRNGKey(0), train=False)[0])(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(150):
    params, opt_state = step(params, opt_state)
  trained = attacks.membership_auc(model, params, timelines, split_, 16)
  assert trained["mia_auc"] > 0.8 and trained["mia_loss_gap"] > 0
