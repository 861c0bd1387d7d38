"""FELLRec's dynamic balance: a personalised model per client, aggregated from
the other clients' models by similarity and warmed up by a curriculum
("A Federated Framework for LLM-based Recommendation", Zhao et al.,
arXiv 2402.09959, NAACL Findings 2025).

Each client keeps its own parameters theta_i in its persistent state (the
paper personalises LoRA adapters; here the whole task model, or the adapters
when the task has them) and starts local training from them; a client that
has not trained yet starts from the server's model. After local training, with
D_i = theta_i(local) - theta_server over the clients c of the cohort that
finished the round (weights > 0):

    s_ij = (cos(D_i, D_j) + 1) / 2                      similarity, in [0, 1]
    a_ij = s_ij / sum_{k != i} s_ik    (j != i)          attention over the others
    l_i  = softmax_c(loss_c / temperature)_i             normalised local loss
    w_i  = tanh(alpha / l_i ** (r + 1 / beta))           curriculum heating
    theta_i <- theta_server + (1 - w_i) D_i + w_i sum_{j != i} a_ij D_j

r is the round index. With `include_self` the attention runs over every
present client, i included (s_ii = 1): as the heating drives w_i to 1, the
default formula leaves a client's own update out of its model, this variant
keeps a share of it. A client with a high loss (it lags: l_i near 1) has a
small w_i early and keeps more of its own model; as r grows l_i ** (r + 1/beta)
falls toward 0 and every w_i rises toward 1, so all clients learn more from
the others over time (the "heating"). The similarity is taken between the
updates D rather than the raw parameters: LoRA adapters (the paper's theta)
are already a deviation from a shared frozen base, and the deviation of a
fully trained model from the server's is the same quantity (the raw
parameters of every client share the base and have cosine near 1).

Identical clients (the same D) get theta_i = theta_server + D: the FedAvg
model. The server model itself stays the FedAvg average of the local models,
so clients that never trained (the participation gap's non-participating
clients) are served by it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from infra.errors import ConfigError

PyTree = Any
PERSONALISATIONS = ("none", "fellrec", "local")


def flat_rows(tree: PyTree) -> jax.Array:
  """[clients, P] every leaf of a [clients, ...] pytree, flattened and joined."""
  return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32)
                          for x in jax.tree.leaves(tree)], axis=1)


def similarity(deltas: PyTree) -> jax.Array:
  """[clients, clients] s_ij = (cos(D_i, D_j) + 1) / 2 (0.5 against a zero update)."""
  rows = flat_rows(deltas)
  norms = jnp.linalg.norm(rows, axis=1)
  unit = rows / jnp.maximum(norms, 1e-12)[:, None]
  return (unit @ unit.T + 1.0) / 2.0


def heating_weights(losses: jax.Array, present: jax.Array, round_index,
                    alpha: float, beta: float, temperature: float) -> jax.Array:
  """[clients] w_i = tanh(alpha / l_i ** (r + 1/beta)), l = softmax(loss / T)
  over the present clients (absent clients get w = 0)."""
  logits = jnp.where(present, losses / temperature, -jnp.inf)
  log_l = jax.nn.log_softmax(logits)
  exponent = round_index.astype(jnp.float32) + 1.0 / beta
  # alpha / l ** e = alpha * exp(-e log l): overflow goes to inf, tanh to 1
  w = jnp.tanh(alpha * jnp.exp(-exponent * jnp.where(present, log_l, 0.0)))
  return jnp.where(present, w, 0.0)


def attention(sim: jax.Array, present: jax.Array, include_self: bool = False
              ) -> jax.Array:
  """[clients, clients] a_ij over the other present clients (with
  `include_self`, over all present clients, s_ii = 1); rows sum to 1, or to 0
  for a client with no one to attend to."""
  others = present[None, :] & present[:, None]
  if not include_self:
    others &= ~jnp.eye(sim.shape[0], dtype=bool)
  scores = jnp.where(others, sim, 0.0)
  total = scores.sum(1, keepdims=True)
  return jnp.where(total > 0, scores / jnp.maximum(total, 1e-12), 0.0)


def personalised_deltas(deltas: PyTree, losses: jax.Array, weights: jax.Array,
                        round_index, alpha: float, beta: float,
                        temperature: float, include_self: bool = False
                        ) -> tuple[PyTree, dict]:
  """Every client's personalised model minus the server's, from the cohort's
  updates (leaves [clients, ...]); clients with weight 0 keep their own D.

  Returns (new D [clients, ...], {"w": [clients], "attention": [c, c]}).
  """
  present = weights > 0
  losses = jnp.where(present & jnp.isfinite(losses), losses, 0.0)
  w = heating_weights(losses, present, round_index, alpha, beta, temperature)
  a = attention(similarity(deltas), present, include_self)
  has_peers = a.sum(1) > 0
  w = jnp.where(has_peers, w, 0.0)  # alone in the cohort: its own model

  def mix(d):
    flat = d.reshape(d.shape[0], -1).astype(jnp.float32)
    mixed = (1.0 - w)[:, None] * flat + w[:, None] * (a @ flat)
    return mixed.reshape(d.shape).astype(d.dtype)

  return jax.tree.map(mix, deltas), {"w": w, "attention": a}


def balance_metrics(parts: dict, present: jax.Array) -> dict:
  """Where the round's balance went, over the clients that finished it:
  `balance_w_mean` and `balance_w_min` (the share of a model taken from the
  others), `balance_own_kept` (the share of clients whose own update is at
  least half their model: w_i <= 0.5) and `balance_attention_max` (the mean
  over clients of its largest attention weight; 1 / (n - 1) when the
  attention is uniform over the other n - 1)."""
  n = jnp.maximum(present.sum(), 1)
  w = parts["w"]
  return {"balance_w_mean": jnp.sum(jnp.where(present, w, 0.0)) / n,
          "balance_w_min": jnp.min(jnp.where(present, w, 1.0)),
          "balance_own_kept": jnp.sum(present & (w <= 0.5)) / n,
          "balance_attention_max": jnp.sum(jnp.where(
              present, parts["attention"].max(1), 0.0)) / n}


@dataclasses.dataclass(frozen=True)
class FELLRec:
  """The per-client hooks of FELLRec's dynamic balance for the round
  (federated/algorithms.py): `state_init`, `start` (ClientSpec) and
  `personalise` (ServerSpec). A client's state is {"params": its model,
  "trained": whether it has one yet}."""
  alpha: float = 0.7
  beta: float = 1.0
  temperature: float = 0.05
  include_self: bool = False  # a_ii in the attention (see the README)

  def state_init(self, params: PyTree) -> dict:
    return {"params": params, "trained": jnp.zeros((), bool)}

  def start(self, server_params: PyTree, client_state: dict) -> PyTree:
    return jax.tree.map(lambda own, server: jnp.where(client_state["trained"],
                                                      own, server),
                        client_state["params"], server_params)

  def personalise(self, client_states: dict, server_params: PyTree,
                  deltas: PyTree, losses: jax.Array, weights: jax.Array,
                  round_index) -> tuple[dict, dict]:
    """(the cohort's new states: personalised params, server + mixed D
    (clients with weight 0 are not written back by the round); the round's
    balance metrics, `balance_metrics`)."""
    mixed, parts = personalised_deltas(deltas, losses, weights, round_index,
                                       self.alpha, self.beta, self.temperature,
                                       self.include_self)
    return ({"params": jax.tree.map(lambda server, d: server[None] + d,
                                    server_params, mixed),
             "trained": client_states["trained"] | (weights > 0)},
            balance_metrics(parts, weights > 0))


@dataclasses.dataclass(frozen=True)
class LocalOnly(FELLRec):
  """Local-only models, the control FELLRec's mixing is measured against:
  every client trains on from its own last model and keeps what it trained,
  nothing of the others' (FELLRec with w_i = 0). The server still averages
  the cohort's models, which serve the clients that never trained."""

  def personalise(self, client_states: dict, server_params: PyTree,
                  deltas: PyTree, losses: jax.Array, weights: jax.Array,
                  round_index) -> tuple[dict, dict]:
    del losses, round_index
    return ({"params": jax.tree.map(lambda server, d: server[None] + d,
                                    server_params, deltas),
             "trained": client_states["trained"] | (weights > 0)}, {})


def from_config(fed) -> FELLRec | None:
  """The personalisation `config.federated.personalisation` names (None for
  "none"), with `config.federated.fellrec`'s alpha, beta and temperature."""
  name = fed.get("personalisation", "none")
  if name == "none":
    return None
  if name == "local":
    return LocalOnly()
  if name != "fellrec":
    raise ConfigError(f"config.federated.personalisation={name!r} is not one of "
                      f"{PERSONALISATIONS}")
  cfg = fed.fellrec
  for field in ("alpha", "beta", "temperature"):
    if not cfg[field] > 0:
      raise ConfigError(f"config.federated.fellrec.{field}={cfg[field]} must be > 0")
  return FELLRec(alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature,
                 include_self=bool(cfg.include_self))
