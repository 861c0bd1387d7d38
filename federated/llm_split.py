"""FELLRec's flexible storage on the federated LLM ("A Federated Framework
for LLM-based Recommendation", Zhao et al., arXiv 2402.09959, section 3.3):
the client keeps the sensitive layers, the server holds the middle.

For the decoder LLM (userllm/models/llm.py) with L layers and a cut k in
0..L // 2, the client holds

    embedder (the input embedding, tied with the output layer),
    layer_0 .. layer_{k-1} and layer_{L-k} .. layer_{L-1}, final_norm,

base weights and adapters alike, and the server holds the middle layers
layer_k .. layer_{L-k-1} (their base and their adapters). The forward pass
runs client-front (embedding + the first k layers) -> server-middle ->
client-last (the last k layers, final norm, tied output softmax), so the
prompt's tokens, the answer and the scores never leave the device; what
crosses is the activations at the two cuts and, backwards, their gradients.
k = L // 2 with L even (every layer on the client) is plain federated
learning: nothing crosses.

`split_value_and_grad` computes the loss and its gradient with respect to
every adapter the way split learning does, as three programs that exchange
only the crossing tensors (jax.vjp on each side); it equals the unsplit
gradient (tests/test_federated_llm_split.py), so a split round trains the
same adapters as the plain round, and what the split changes is what each
side stores and sends: `client_cost` counts it, `client_memory` measures the
client's programs from XLA's compiled memory, and the activations the client
sends up are what federated/attacks.activation_inversion_accuracy reads.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from federated import frozen_base
from userllm.models import adapters as adapters_lib, llm

PyTree = Any
CLIENT_ALWAYS = ("embedder", "final_norm")
# The four tensors [b, t, embed] that cross the cuts in one local step, and
# the mask [b, t] the server needs for the attention layout.
CROSSING = ("activations_up", "activations_down", "gradients_up",
            "gradients_down")


def check_cut(num_layers: int, k: int) -> None:
  if not 0 <= 2 * k <= num_layers:
    raise ValueError(f"split cut k={k}: the client keeps the first and last k "
                     f"of {num_layers} layers, so k must be in 0..{num_layers // 2}")


def client_layer_names(num_layers: int, k: int) -> tuple[str, ...]:
  """The top-level parameter names the client keeps at cut k."""
  check_cut(num_layers, k)
  ends = list(range(k)) + list(range(num_layers - k, num_layers))
  return CLIENT_ALWAYS + tuple(f"layer_{i}" for i in sorted(set(ends)))


def split_tree(params: dict, num_layers: int, k: int) -> tuple[dict, dict]:
  """(client part, server part) of an LLM tree (base, adapters or both) at
  cut k, by top-level name."""
  mine = set(client_layer_names(num_layers, k))
  return ({n: p for n, p in params.items() if n in mine},
          {n: p for n, p in params.items() if n not in mine})


def _front(model: llm.DecoderLM, params: dict, tokens, k: int, task_ids):
  """Client: tokens [b, t] -> activations after layer k - 1 [b, t, embed]."""
  def run(m, tokens):
    return m.run_layers(m.embed(tokens), tokens != 0, 0, k, task_ids)
  return model.apply({"params": params}, tokens, method=run)


def _middle(model: llm.DecoderLM, params: dict, x, mask, k: int, task_ids):
  """Server: layers k .. L-k-1 over the client's activations [b, t, embed]."""
  stop = model.config.num_layers - k
  return model.apply({"params": params}, x, mask, k, stop, task_ids,
                     method=llm.DecoderLM.run_layers)


def _last(model: llm.DecoderLM, params: dict, x, mask, k: int, task_ids):
  """Client: the server's activations -> logits [b, t, vocab]."""
  layers = model.config.num_layers

  def run(m, x, mask):
    return m.head(m.run_layers(x, mask, layers - k, layers, task_ids))
  return model.apply({"params": params}, x, mask, method=run)


def split_value_and_grad(model: llm.DecoderLM,
                         loss_of_logits: Callable[[jax.Array, jax.Array], jax.Array],
                         adapters: dict, base: dict, tokens: jax.Array, k: int,
                         task_ids: jax.Array | None = None):
  """The loss and d loss / d adapters, computed by split learning at cut k.

  loss_of_logits: (logits [b, t, vocab], tokens [b, t]) -> [] (the client's
  loss; it runs on the client). adapters, base: the LLM's two trees
  (adapters_lib.split_adapters). tokens: [b, t] left-padded ids.

  Returns (loss [], grads (the adapters' tree), crossing {name: [b, t,
  embed]} for `CROSSING`: the activations the client sends up at cut k and
  those the server sends back, and their gradients, sent the other way).
  """
  num_layers = model.config.num_layers
  mask = tokens != 0
  client_adapters, server_adapters = split_tree(adapters, num_layers, k)
  client_base, server_base = split_tree(base, num_layers, k)
  on_client = lambda a: adapters_lib.merge_adapters(a, client_base)  # noqa: E731
  on_server = lambda a: adapters_lib.merge_adapters(a, server_base)  # noqa: E731

  up, front_vjp = jax.vjp(
      lambda a: _front(model, on_client(a), tokens, k, task_ids), client_adapters)
  down, middle_vjp = jax.vjp(
      lambda a, x: _middle(model, on_server(a), x, mask, k, task_ids),
      server_adapters, up)
  loss, (last_grads, grad_down) = jax.value_and_grad(
      lambda a, x: loss_of_logits(_last(model, on_client(a), x, mask, k,
                                        task_ids), tokens),
      argnums=(0, 1))(client_adapters, down)
  server_grads, grad_up = middle_vjp(grad_down)
  (front_grads,) = front_vjp(grad_up)
  client_grads = jax.tree.map(jnp.add, front_grads, last_grads)
  # d loss / d down is what the client sends up; d loss / d up comes back down
  crossing = dict(zip(CROSSING, (up, down, grad_down, grad_up)))
  return loss, adapters_lib.merge_adapters(client_grads, server_grads), crossing


def client_cost(adapters: dict, base: dict, num_layers: int, k: int,
                batch_size: int, width: int, embed_dim: int, local_steps: int,
                bytes_per_value: int = 4) -> dict[str, float]:
  """What one client stores and sends in a round at cut k (bytes).

  Stored: its part of the base and of the adapters. Sent per round: its
  adapters up and down once (the server still averages the client-held
  adapters over the cohort) and, while the server holds a layer, per local
  step the four crossing tensors [batch, width, embed] and the mask
  [batch, width] (one byte a token).
  """
  client_base, server_base = split_tree(base, num_layers, k)
  client_adapters, server_adapters = split_tree(adapters, num_layers, k)
  nbytes = frozen_base.tree_bytes
  server_layers = num_layers - 2 * k
  per_step = (len(CROSSING) * batch_size * width * embed_dim * bytes_per_value
              + batch_size * width) if server_layers else 0
  stored = nbytes(client_base) + nbytes(client_adapters)
  whole = nbytes(base) + nbytes(adapters)
  return {"k": k, "server_layers": server_layers,
          "client_stored_bytes": stored, "whole_model_bytes": whole,
          "client_share": stored / max(whole, 1),
          "client_adapter_bytes": nbytes(client_adapters),
          "adapter_bytes": nbytes(adapters),
          "round_bytes": (2 * nbytes(client_adapters)
                          + per_step * local_steps),
          "crossing_bytes_per_step": per_step}


def client_memory(model: llm.DecoderLM, loss_of_logits, adapters: dict,
                  base: dict, tokens: jax.Array, k: int) -> dict[str, int]:
  """XLA's compiled memory (arguments + outputs + temporaries - aliased,
  bytes) of the client's programs in one local step at cut k: the front
  forward, then the last side's forward and backward with the front's
  backward (recomputing the front: the client keeps no activations between
  the two), against the unsplit step on one device. Shapes only: the trees
  may be abstract."""
  num_layers = model.config.num_layers
  client_adapters, _ = split_tree(adapters, num_layers, k)
  client_base, _ = split_tree(base, num_layers, k)
  embed = model.config.embed_dim
  cut = jax.ShapeDtypeStruct(tokens.shape + (embed,), jnp.dtype(model.config.dtype))

  def front(a, b, tokens):
    return _front(model, adapters_lib.merge_adapters(a, b), tokens, k, None)

  def back(a, b, tokens, down, grad_up):
    whole = lambda a: adapters_lib.merge_adapters(a, b)  # noqa: E731
    loss, (last_grads, grad_down) = jax.value_and_grad(
        lambda a, x: loss_of_logits(_last(model, whole(a), x, tokens != 0, k,
                                          None), tokens),
        argnums=(0, 1))(a, down)
    _, front_vjp = jax.vjp(lambda a: front(a, b, tokens), a)
    (front_grads,) = front_vjp(grad_up)
    return loss, jax.tree.map(jnp.add, front_grads, last_grads), grad_down

  def unsplit(a, b, tokens):
    return jax.value_and_grad(lambda a: loss_of_logits(model.apply(
        {"params": adapters_lib.merge_adapters(a, b)}, tokens, tokens != 0)[0], tokens))(a)

  def peak(stats):
    return stats["argument"] + stats["output"] + stats["temp"] - stats["alias"]

  front_stats = frozen_base.compiled_memory(front, client_adapters, client_base, tokens)
  back_stats = frozen_base.compiled_memory(back, client_adapters, client_base,
                                           tokens, cut, cut)
  whole_stats = frozen_base.compiled_memory(unsplit, adapters, base, tokens)
  return {"client_front": peak(front_stats), "client_back": peak(back_stats),
          "client_peak": max(peak(front_stats), peak(back_stats)),
          "unsplit": peak(whole_stats)}

