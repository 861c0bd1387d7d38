"""FELLRec's flexible storage on the LLM (federated/llm_split.py): the split
forward/backward, three programs exchanging only the tensors at the cuts,
gives the unsplit loss and adapter gradients; what each side stores and
sends is counted, and the client's programs are measured smaller than the
unsplit step by XLA's compiled memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from federated import attacks, frozen_base, llm_split, llm_task
from userllm.models import adapters, llm
from test_federated_algorithms import assert_trees_close

LAYERS = 4
# head_dim 12 != embed 40 / heads 4, grouped-query attention, Gemma 2's norms
# and soft caps: the split must carry every layer's own settings.
CONFIG = llm.LLMConfig(
    vocab_size=90, embed_dim=40, num_layers=LAYERS, num_heads=4, num_kv_heads=2,
    head_dim=12, mlp_dim=64, post_norms=True, attn_logit_softcap=50.0,
    final_logit_softcap=30.0, sliding_window=4, global_every=2,
    adapter=adapters.AdapterConfig(kind="mode", rank=2, num_experts=3,
                                   targets=("q", "v", "out", "gate", "down")))
IS_TITLE = jnp.arange(CONFIG.vocab_size) >= 10


@pytest.fixture(scope="module")
def lm():
  """(model, adapters with non-zero values everywhere, base, tokens [b, t]
  left-padded)."""
  model = llm.DecoderLM(CONFIG)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CONFIG.vocab_size, (3, 9)).astype(np.int32)
  tokens[0, :3] = 0  # left padding
  whole = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(tokens),
                                   jnp.asarray(tokens) != 0)["params"])
  adapter_part, base = adapters.split_adapters(whole)
  # LoRA's up-projections start at zero, which would hide a wrong gradient.
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
  adapter_part = jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), adapter_part)
  return model, adapter_part, base, jnp.asarray(tokens)


def mean_row_loss(logits, tokens):
  return llm_task.row_losses(0.5, IS_TITLE, logits, tokens).mean()


def unsplit_value_and_grad(model, adapter_part, base, tokens):
  def loss(a):
    logits, _ = model.apply({"params": adapters.merge_adapters(a, base)}, tokens,
                            tokens != 0)
    return mean_row_loss(logits, tokens)
  return jax.value_and_grad(loss)(adapter_part)


def test_the_client_keeps_the_first_and_last_k_layers_and_the_embeddings():
  assert llm_split.client_layer_names(4, 0) == ("embedder", "final_norm")
  assert llm_split.client_layer_names(4, 1) == (
      "embedder", "final_norm", "layer_0", "layer_3")
  assert len(llm_split.client_layer_names(4, 2)) == 6
  with pytest.raises(ValueError, match="k must be in 0..2"):
    llm_split.client_layer_names(4, 3)


def test_split_forward_backward_equals_the_unsplit_step(lm):
  """At k = 1 every side runs layers: front (layer 0), middle (1, 2), last (3)."""
  model, adapter_part, base, tokens = lm
  loss, grads, crossing = jax.jit(functools.partial(
      llm_split.split_value_and_grad, model, mean_row_loss, k=1))(
          adapter_part, base, tokens)
  want_loss, want_grads = unsplit_value_and_grad(model, adapter_part, base, tokens)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  assert_trees_close(grads, want_grads, atol=1e-5)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3
  for name in llm_split.CROSSING:
    assert crossing[name].shape == tokens.shape + (CONFIG.embed_dim,)


def test_at_cut_zero_the_embeddings_go_up_and_the_server_runs_every_layer(lm):
  model, adapter_part, base, tokens = lm
  client, server = llm_split.split_tree(adapters.merge_adapters(adapter_part, base),
                                        LAYERS, 0)
  up = llm_split._front(model, client, tokens, 0, None)
  embedded = model.apply({"params": base}, tokens, method=llm.DecoderLM.embed)
  np.testing.assert_allclose(up, embedded, rtol=1e-6)
  assert set(server) == {f"layer_{i}" for i in range(LAYERS)}


def test_cost_counts_what_each_side_stores_and_sends(lm):
  model, adapter_part, base, tokens = lm
  cost = {k: llm_split.client_cost(adapter_part, base, LAYERS, k, batch_size=8,
                                   width=20, embed_dim=CONFIG.embed_dim,
                                   local_steps=3)
          for k in (0, 1, 2)}
  whole = frozen_base.tree_bytes(adapter_part) + frozen_base.tree_bytes(base)
  assert cost[2]["client_stored_bytes"] == whole  # plain FL: all on the client
  assert cost[2]["crossing_bytes_per_step"] == 0
  assert cost[2]["round_bytes"] == 2 * frozen_base.tree_bytes(adapter_part)
  assert (cost[0]["client_stored_bytes"] < cost[1]["client_stored_bytes"]
          < whole)
  assert cost[0]["client_adapter_bytes"] == 0  # every adapter at the server
  assert cost[1]["crossing_bytes_per_step"] == 4 * 8 * 20 * 40 * 4 + 8 * 20
  assert cost[1]["round_bytes"] == (2 * cost[1]["client_adapter_bytes"]
                                    + 3 * cost[1]["crossing_bytes_per_step"])


def test_the_clients_programs_hold_less_than_the_unsplit_step(lm):
  model, adapter_part, base, tokens = lm
  memory = llm_split.client_memory(model, mean_row_loss, adapter_part, base,
                                  tokens, 1)
  assert 0 < memory["client_front"] <= memory["client_peak"] < memory["unsplit"]


def test_the_embeddings_sent_up_at_cut_zero_give_the_tokens_away(lm):
  """At k = 0 the server reads the prompt from what it is sent: a ridge
  decoder fitted on other rows recovers the tokens far above chance."""
  model, _, base, _ = lm
  tokens = np.random.default_rng(1).integers(1, 30, (64, 9)).astype(np.int32)
  embedded = np.asarray(model.apply({"params": base}, jnp.asarray(tokens),
                                    method=llm.DecoderLM.embed))
  flat, ids = embedded.reshape(-1, CONFIG.embed_dim), tokens.reshape(-1)
  half = len(ids) // 2
  accuracy = attacks.activation_inversion_accuracy(
      flat[:half], ids[:half], flat[half:], ids[half:], CONFIG.vocab_size)
  assert accuracy > 0.9  # chance: 1 / 29
