"""FELLRec's flexible storage: the client keeps the sensitive layers, the
server holds the middle of the model ("A Federated Framework for LLM-based
Recommendation", Zhao et al., arXiv 2402.09959).

For the next-item transformer (userllm/models/sequence_model.py, id fusion) with L
blocks and a cut k in 0..L, the client holds

    item_embed (the input layer, tied with the output layer), position_embed,
    block_0 .. block_{k-1}, final_norm (the last layer before the output),

and the server holds block_k .. block_{L-1}. The forward pass runs
client-front (embeddings + the first k blocks) -> server-middle (the rest of
the blocks) -> client-last (final norm + tied output softmax), so the items a
user interacted with and the scores of what comes next never leave the device;
the server sees the activations at the cut (and sends back those after its
blocks). k = L is plain federated learning: everything on the client.

Because the composition is the same function, gradients are the unsplit
model's (split learning trains it with the activations' gradients sent back
across each cut); what changes is what each side stores and sends:
`client_cost` counts it. What the activations at the cut still reveal is
measured by federated/attacks.activation_inversion_accuracy.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from userllm.models import sequence_model as sm

PyTree = Any
CLIENT_ALWAYS = ("item_embed", "position_embed", "final_norm")


def client_layer_names(num_layers: int, k: int) -> tuple[str, ...]:
  """The top-level parameter names the client keeps at cut k (0 <= k <= L)."""
  if not 0 <= k <= num_layers:
    raise ValueError(f"split cut k={k} must be in 0..{num_layers}")
  return CLIENT_ALWAYS + tuple(f"block_{i}" for i in range(k))


def split_params(params: dict, num_layers: int, k: int) -> tuple[dict, dict]:
  """(client params, server params) of an id-fusion transformer at cut k."""
  mine = set(client_layer_names(num_layers, k))
  return ({n: p for n, p in params.items() if n in mine},
          {n: p for n, p in params.items() if n not in mine})


def client_front(model: sm.ItemSequenceTransformer, client_params: dict,
                 items: jax.Array, k: int):
  """items [b, len] -> (activations at the cut [b, len, embed], mask): what
  the client sends up."""
  def front(m, items):
    x, mask = m.embed_items(items)
    return m.run_blocks(x, mask, 0, k), mask

  return model.apply({"params": client_params}, items, method=front)


def server_middle(model: sm.ItemSequenceTransformer, server_params: dict,
                  x: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """The server's blocks k..L-1 over the client's activations [b, len, embed]."""
  block = sm.Block(model.config)  # the server holds no embeddings to set up
  for i in range(k, model.config.num_layers):
    x = block.apply({"params": server_params[f"block_{i}"]}, x, mask, False)
  return x


def client_last(model: sm.ItemSequenceTransformer, client_params: dict,
                x: jax.Array) -> jax.Array:
  """The server's output activations [b, len, embed] -> next-item logits
  [b, len, vocab] on the client."""
  return model.apply({"params": client_params}, x,
                     method=lambda m, x: m.item_logits(m.final_states(x)))


def split_logits(model: sm.ItemSequenceTransformer, params: dict,
                 items: jax.Array, k: int) -> jax.Array:
  """The next-item logits [b, len, vocab] computed split at cut k (equal to
  `model.apply(params, items)`)."""
  client, server = split_params(params, model.config.num_layers, k)
  x, mask = client_front(model, client, items, k)
  return client_last(model, client, server_middle(model, server, x, mask, k))


def tree_bytes(tree: PyTree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def client_cost(params: dict, num_layers: int, k: int, batch_size: int,
                max_len: int, embed_dim: int, local_steps: int,
                bytes_per_value: int = 4) -> dict[str, float]:
  """What one client stores and sends in a round at cut k.

  Stored: its parameters. Sent per round: its parameters up and down once
  (the client-held layers are still averaged by the server), and, when a
  server part exists (k < L), per local step the activations at both cuts and
  their gradients: 4 tensors of [batch, max_len, embed].
  """
  client, server = split_params(params, num_layers, k)
  client_bytes = tree_bytes(client)
  per_step = (4 * batch_size * max_len * embed_dim * bytes_per_value
              if k < num_layers else 0)
  return {"k": k, "client_param_bytes": client_bytes,
          "server_param_bytes": tree_bytes(server),
          "client_share": client_bytes / max(tree_bytes(params), 1),
          "round_bytes": 2 * client_bytes + per_step * local_steps,
          "activation_bytes_per_step": per_step}
