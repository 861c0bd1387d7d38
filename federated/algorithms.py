"""Federated algorithms as pure functions: the FedAvg family with server optimisers.

A round is `round(server_state, cohort) -> (server_state, metrics)`:

  1. every cohort client runs `client_update` from the server parameters: local
     epochs of an optax optimiser over its own padded, masked examples, the local
     steps in `lax.scan` (one client = one traced function, no Python loop);
  2. the clients are `vmap`ped over the cohort's leading axis (sharded over the
     mesh's `data` axis, so each device trains its slice of the cohort);
  3. an aggregator (`federated/aggregators.py`, with its own state) combines
     their parameter deltas, weighted by example count (or uniformly), with
     dropped-out clients at weight zero;
  4. the server treats minus the aggregate as a gradient for its optax
     optimiser: SGD(1) is FedAvg, SGD with momentum FedAvgM, Adam FedAdam, Yogi
     FedYogi ("Adaptive Federated Optimization", Reddi et al. 2021).

Seams for the algorithms to come (each a field of a spec, defaults are no-ops):
- client objective terms (`ClientSpec.terms`): `term(params, context) ->
  scalar` added to every local step's loss; `context` holds the round's
  `server_params` and the client's `client_state`. FedProx is the term
  `prox_mu / 2 * ||w - w_server||^2`.
- per-client state that persists across rounds (`ClientSpec.state_init`,
  `ClientSpec.state_update`): a [num_clients, ...] table in the server state,
  sharded over the mesh's `data` axis; the cohort's rows are gathered before
  the clients train and written back after.
- personalised models (`ClientSpec.start`, `ServerSpec.personalise`): a
  client may start local training from parameters of its own (kept in its
  state) rather than the server's, and the server may rewrite the cohort's
  client states from all of their updates at once (FELLRec's
  similarity-weighted aggregation, federated/personalisation.py). Deltas are
  always local parameters minus the *server's*, so the server model stays the
  (weighted) average of the cohort's local models.
- a server-side loss term f_c (`ServerSpec.server_loss(params, server_batch,
  rng[, frozen]) -> scalar`, server data in the cohort under `server_batch`,
  or a regulariser of the parameters alone; `frozen` as for the clients' loss
  when the round is given frozen weights), joined to the federated objective
  by one of the three mixed-FL algorithms below (`ServerSpec.mixing`).
- frozen weights (`round(state, cohort, frozen)`): parameters every client
  reads but none trains, e.g. an LLM's base weights under adapters
  (federated/frozen_base.py). They are an argument of the round, closed over
  by the vmapped client function (never vmapped, so never copied per client;
  sharded as the caller lays them out), and reach the loss as
  `example_loss(params, examples, rng, frozen)`. Without them (None) the loss
  takes three arguments, as before.

Mixed FL (Augenstein et al., "Mixed Federated Learning", arXiv 2205.13655),
objective f = f_f + f_c. With x the round's server parameters, D_f the
aggregate of the client deltas, g_c(y) = grad f_c(y) and S central steps of
SGD at rate eta_c on the server (`central_steps`, `central_learning_rate`):

  parallel:  the clients train on f_k as in FedAvg; from the same x the
             server takes y_{s+1} = y_s - eta_c g_c(y_s), D_c = y_S - x;
             pseudo-gradient p = -(D_f + D_c).
  one_way:   g_c(x) is sent to the clients, and every local step descends
             f_k(y) + <g_c(x), y> (gradient grad f_k(y) + g_c(x)); p = -D_f.
  two_way:   the clients as in one_way, and each also returns its full-batch
             gradient at x; their weighted mean g_f = grad f_f(x) (the
             federated gradient, obtained by differentiating every client's
             loss inside the vmapped round) augments the server's steps:
             y_{s+1} = y_s - eta_c (g_c(y_s) + g_f), D_c = y_S - x;
             p = -(D_f + D_c).

The server optimiser then applies p (x <- x - opt(p)). Parallel with S = 1,
eta_c = 1 is "add g_c(x) to the pseudo-gradient". Both terms of one_way and
two_way descend the whole objective f, so their fixed points are its
minimisers whatever the step budgets; parallel's is a minimiser only when the
client and server step budgets balance (tested on a quadratic, where all
three have closed forms).

FedSGD is one full-batch client step at learning rate 1 (so the delta is minus
the client's mean gradient) and a server SGD step.

The cohort is a dict of arrays with a leading clients axis:
  examples:     [clients, max_examples, ...] the clients' examples, zero-padded;
  num_examples: [clients] int32, how many leading rows of `examples` are real;
  client_ids:   [clients] int32, each client's global id (seeds its local RNG, so
                a client's update does not depend on its slot in the cohort);
  client_rows:  [clients] int32, each client's row in the per-client state table;
  server_batch: (optional) the server's data for `ServerSpec.server_loss`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from federated import aggregators, compression, personalisation
from infra.errors import ConfigError

PyTree = Any
# example_loss(params, examples [batch, ...], rng[, frozen]) -> per-example
# losses [batch]; `frozen` only when the round is given frozen weights.
ExampleLoss = Callable[..., jax.Array]
# term(params, context) -> scalar added to a client's local objective.
ClientTerm = Callable[[PyTree, dict], jax.Array]

ALGORITHMS = ("fedsgd", "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi")
WEIGHTINGS = ("examples", "uniform")
MIXINGS = ("parallel", "one_way", "two_way")
# Server learning rates used when config.federated.server_learning_rate is 0:
# 1 makes fedavg/fedprox the plain average of client models (McMahan et al.);
# adaptive server optimisers take much smaller steps (Reddi et al. 2021).
DEFAULT_SERVER_LEARNING_RATES = {"fedsgd": 1.0, "fedavg": 1.0, "fedprox": 1.0,
                                 "fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2}


def proximal_term(mu: float) -> ClientTerm:
  """FedProx: mu / 2 * ||params - server_params||^2."""

  def term(params, context):
    return 0.5 * mu * optax.tree.norm(
        optax.tree.sub(params, context["server_params"]), squared=True)

  return term


def _no_state(params):
  del params
  return ()


def _keep_state(state, params_before, params_after, metrics):
  del params_before, params_after, metrics
  return state


def _server_start(server_params, client_state):
  del client_state
  return server_params


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """How every client trains locally.

  Attributes:
    optimizer: optax optimiser of the local steps (state fresh every round).
    local_epochs: passes over the client's examples per round.
    batch_size: examples per local step; `None` means all of `max_examples`
      (one full-batch step per epoch, as FedSGD needs).
    terms: objective terms added to every local step's loss (FedProx's
      proximal term, later gradient-transfer terms).
    state_init: params -> one client's initial persistent state (default:
      none, an empty tuple).
    state_update: (state, params at the round's start, params after local
      training, metrics) -> the client's state for its next round.
    start: (server params, client state) -> the parameters local training
      starts from (default: the server's).
  """
  optimizer: optax.GradientTransformation
  local_epochs: int = 1
  batch_size: int | None = None
  terms: tuple[ClientTerm, ...] = ()
  state_init: Callable[[PyTree], PyTree] = _no_state
  state_update: Callable[..., PyTree] = _keep_state
  start: Callable[[PyTree, PyTree], PyTree] = _server_start


@dataclasses.dataclass(frozen=True)
class ServerSpec:
  """How the server combines client deltas.

  Attributes:
    optimizer: optax optimiser applied to minus the aggregate client delta.
    weighting: "examples" (weight = example count) or "uniform" (every client
      with at least one example counts once).
    dropout_rate: probability that a sampled client drops out of the round and
      contributes nothing (drawn per client per round from the round's RNG).
    aggregator: combines the deltas (default: the weighted mean).
    server_loss: optional f_c(params, server_batch, rng) -> scalar, a loss
      computed at the server, joined to the clients' by `mixing`.
    mixing: "parallel" | "one_way" | "two_way" (the module docstring).
    central_steps, central_learning_rate: the server's SGD steps on f_c
      (parallel, two_way).
    personalise: optional (client_states, server_params, deltas, losses,
      weights, round) -> (client_states over the cohort (leaves [clients,
      ...]; `server_params` the round's starting ones; `deltas` local
      minus server parameters, `losses` the clients' mean local losses,
      `weights` 0 for clients that did not finish): the cohort's new
      per-client states, computed from every client's update together;
      {name: scalar} added to the round's metrics).
  """
  optimizer: optax.GradientTransformation
  weighting: str = "examples"
  dropout_rate: float = 0.0
  aggregator: aggregators.Aggregator = dataclasses.field(
      default_factory=aggregators.mean)
  server_loss: Callable[[PyTree, Any, jax.Array], jax.Array] | None = None
  mixing: str = "parallel"
  central_steps: int = 1
  central_learning_rate: float = 1.0
  personalise: Callable[..., PyTree] | None = None


@flax.struct.dataclass
class ServerState:
  """Everything a federated resume needs (the state `fit` carries).

  step counts rounds; params and opt_state are the server's; aggregator_state
  is the aggregator's; client_states is the per-client table, every leaf
  [num_client_rows, ...] (an empty tuple when clients keep no state).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  aggregator_state: PyTree
  client_states: PyTree


def init_server_state(params: PyTree, client: ClientSpec, server: ServerSpec,
                      rng: jax.Array, num_client_rows: int) -> ServerState:
  """The round-0 state; each client row's state is `client.state_init(params)`."""
  one = client.state_init(params)
  table = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_client_rows,) + jnp.shape(x)), one)
  return ServerState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=server.optimizer.init(params), rng=rng,
                     aggregator_state=server.aggregator.init(params),
                     client_states=table)


def _select(condition: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """`new` where the scalar `condition` holds, else `old`, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def local_batch_indices(rng: jax.Array, num_examples: jax.Array,
                        max_examples: int, local_epochs: int, batch_size: int):
  """Which example each local step reads, and which of those are real.

  Each epoch visits the client's real examples in a fresh random order and then
  the padding. An example's shuffle key comes from `fold_in(epoch_key, index)`,
  so the order of the real examples does not depend on how much padding follows
  them: the same client padded to a different `max_examples` takes the same
  real steps (the extra all-padding steps are no-ops, see `client_update`).

  Returns:
    indices: [local_epochs * steps_per_epoch, batch_size] int32 in [0, max_examples).
    mask: same shape, bool, True where the index is a real example.
  """
  steps_per_epoch = -(-max_examples // batch_size)
  slots = steps_per_epoch * batch_size
  position = jnp.arange(max_examples)

  def epoch_order(epoch_key):
    keys = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(epoch_key, i))
                    )(position)
    keys = jnp.where(position < num_examples, keys, 2.0 + position)  # pads last
    order = jnp.argsort(keys)
    order = jnp.pad(order, (0, slots - max_examples))  # fill the last batch
    mask = jnp.arange(slots) < num_examples
    return order.reshape(steps_per_epoch, batch_size), mask.reshape(
        steps_per_epoch, batch_size)

  orders, masks = jax.vmap(epoch_order)(jax.random.split(rng, local_epochs))
  return (orders.reshape(-1, batch_size).astype(jnp.int32),
          masks.reshape(-1, batch_size))


def make_client_update(example_loss: ExampleLoss, client: ClientSpec,
                       federated_gradient: bool = False):
  """`client_update(server_params, client_state, examples, num_examples, rng,
  server_grad=None, frozen=None)` for ONE client.

  `server_grad` (mixed FL's one_way / two_way) adds <server_grad, params> to
  every local step's objective. With `federated_gradient` the metrics also
  hold "gradient": the client's full-batch gradient at `server_params`.

  Args (of the returned function):
    server_params: the round's starting parameters.
    client_state: this client's persistent state (see ClientSpec).
    examples: [max_examples, ...] this client's examples, zero-padded.
    num_examples: scalar int, how many leading rows are real.
    rng: this client's key for shuffling and the model's own randomness.
    frozen: weights the loss reads but nobody trains (passed on as its fourth
      argument), or None.

  Returns:
    (delta, client_state, metrics): `delta` = local parameters - server
    parameters (a pytree like the parameters; local training starts from
    `client.start(server_params, client_state)`); the client's next state;
    metrics {"loss": mean local loss over the steps that had data, "steps":
    number of such steps}.
  """

  def client_update(server_params, client_state, examples, num_examples, rng,
                    server_grad=None, frozen=None):
    extra = () if frozen is None else (frozen,)
    max_examples = examples.shape[0]
    batch_size = client.batch_size or max_examples
    order_rng, step_rng = jax.random.split(rng)
    indices, masks = local_batch_indices(order_rng, num_examples, max_examples,
                                         client.local_epochs, batch_size)

    context = {"server_params": server_params, "client_state": client_state}

    def objective(params, batch, mask, key):
      """(the local objective, its data loss: what the metrics report; the
      gradient-transfer term <g, y> is linear, its value meaningless)."""
      losses = example_loss(params, batch, key, *extra)
      data_loss = jnp.sum(losses * mask) / jnp.maximum(mask.sum(), 1)
      loss = data_loss
      for term in client.terms:
        loss += term(params, context)
      if server_grad is not None:
        loss += optax.tree.vdot(server_grad, params)
      return loss, data_loss

    def local_step(carry, step_inputs):
      params, opt_state = carry
      step, index, mask = step_inputs
      (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(
          params, examples[index], mask, jax.random.fold_in(step_rng, step))
      updates, new_opt_state = client.optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # A step of pure padding is a no-op: neither parameters nor the
      # optimiser's state (momentum, step count) move.
      has_data = mask.any()
      return ((_select(has_data, new_params, params),
               _select(has_data, new_opt_state, opt_state)),
              (loss * has_data, has_data))

    steps = jnp.arange(indices.shape[0])
    start = client.start(server_params, client_state)
    (params, _), (losses, has_data) = jax.lax.scan(
        local_step, (start, client.optimizer.init(start)),
        (steps, indices, masks))
    real_steps = has_data.sum()
    delta = optax.tree.sub(params, server_params)
    metrics = {"loss": losses.sum() / jnp.maximum(real_steps, 1),
               "steps": real_steps}
    new_state = client.state_update(client_state, start, params, metrics)
    if federated_gradient:
      real = jnp.arange(max_examples) < num_examples

      def client_loss(p):  # this client's f_k: the mean over its real examples
        losses = example_loss(p, examples, jax.random.fold_in(order_rng, 1),
                              *extra)
        return jnp.sum(losses * real) / jnp.maximum(real.sum(), 1)

      metrics["gradient"] = jax.grad(client_loss)(server_params)
    return delta, new_state, metrics

  return client_update


def client_weights(num_examples: jax.Array, completed: jax.Array,
                   weighting: str) -> jax.Array:
  """[clients] aggregation weights: 0 for dropped clients and empty clients."""
  if weighting == "examples":
    weights = num_examples.astype(jnp.float32)
  elif weighting == "uniform":
    weights = (num_examples > 0).astype(jnp.float32)
  else:
    raise ConfigError(f"config.federated.weighting={weighting!r} is not one of "
                      f"{WEIGHTINGS}")
  return weights * completed


def server_update(state, pseudo_grad: PyTree, any_update: jax.Array,
                  server_tx: optax.GradientTransformation):
  """Applies the server optimiser to `pseudo_grad` (minus the aggregate delta,
  plus the server loss's gradient when there is one).

  A round in which nothing contributed (`any_update` False) leaves the state
  as it was (apart from the round counter): even a zero pseudo-gradient would
  move Adam-style optimisers through their momentum.
  """
  updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1,
                       params=_select(any_update, params, state.params),
                       opt_state=_select(any_update, opt_state, state.opt_state))


def _round_keys(state) -> tuple[jax.Array, jax.Array]:
  """(clients' root key, dropout key) of this round, from (state RNG, round)."""
  clients_key, dropout_key = jax.random.split(
      jax.random.fold_in(state.rng, state.step))
  return clients_key, dropout_key


def _server_keys(state) -> tuple[jax.Array, jax.Array]:
  """(aggregator key, server-loss key) of this round (apart from the clients')."""
  return jax.random.split(jax.random.fold_in(
      jax.random.fold_in(state.rng, state.step), 1 << 30))


def client_rngs(state, client_ids: jax.Array) -> jax.Array:
  """[clients] keys: each from (state RNG, round, client id)."""
  clients_key, _ = _round_keys(state)
  return jax.vmap(lambda c: jax.random.fold_in(clients_key, c))(client_ids)


def completed_mask(state, num_clients: int, dropout_rate: float) -> jax.Array:
  """[clients] float, 1 for clients that finish the round (not dropped out)."""
  if not dropout_rate:
    return jnp.ones((num_clients,), jnp.float32)
  _, dropout_key = _round_keys(state)
  return jax.random.bernoulli(dropout_key, 1.0 - dropout_rate,
                              (num_clients,)).astype(jnp.float32)


def cohort_client_states(state: ServerState, cohort) -> PyTree:
  """The cohort's rows of the per-client state table: leaves [clients, ...]."""
  return jax.tree.map(lambda table: table[cohort["client_rows"]],
                      state.client_states)


def finite_clients(deltas, losses: jax.Array) -> jax.Array:
  """[clients] 1.0 where the client's delta and loss are all finite, else 0.0."""
  finite = jnp.isfinite(losses)
  for d in jax.tree.leaves(deltas):
    finite &= jnp.isfinite(d).reshape(d.shape[0], -1).all(axis=1)
  return finite.astype(jnp.float32)


def _frozen_args(frozen) -> tuple:
  """The losses' trailing arguments: (frozen,) when the round has frozen
  weights, else none (the three-argument losses of the other tasks)."""
  return () if frozen is None else (frozen,)


def _central_inputs(state: ServerState, cohort, frozen=None) -> tuple:
  """(x, server batch, key[, frozen]) at which f_c is read at the round's
  start."""
  _, key = _server_keys(state)
  return (state.params, cohort["server_batch"], jax.random.fold_in(key, 0),
          *_frozen_args(frozen))


def central_grad(state: ServerState, cohort, server: ServerSpec,
                 frozen=None) -> PyTree:
  """grad f_c(x) at the round's server parameters (sent to the clients)."""
  return jax.grad(server.server_loss)(*_central_inputs(state, cohort, frozen))


def central_delta(state: ServerState, cohort, server: ServerSpec,
                  federated_grad: PyTree | None, frozen=None) -> PyTree:
  """D_c = y_S - x after S SGD steps on f_c (plus the constant
  `federated_grad` for two_way) from the server parameters x."""
  _, key = _server_keys(state)

  def step(s, y):
    grad = jax.grad(server.server_loss)(y, cohort["server_batch"],
                                        jax.random.fold_in(key, s),
                                        *_frozen_args(frozen))
    if federated_grad is not None:
      grad = optax.tree.add(grad, federated_grad)
    return jax.tree.map(lambda p, g: p - server.central_learning_rate * g, y, grad)

  end = jax.lax.fori_loop(0, server.central_steps, step, state.params)
  return optax.tree.sub(end, state.params)


def finish_round(state: ServerState, deltas, new_client_states, client_metrics,
                 cohort, server: ServerSpec, frozen=None):
  """Aggregation + server loss + server update + client states + round
  metrics, shared by both round kinds (`frozen`: the round's frozen weights,
  which the server loss reads too)."""
  num_examples = cohort["num_examples"]
  completed = completed_mask(state, num_examples.shape[0], server.dropout_rate)
  # a client whose update or loss is not finite is dropped (and counted), and
  # every dropped client's delta is zeroed: 0 x NaN is NaN in a weighted sum
  finite = finite_clients(deltas, client_metrics["loss"])
  ran = completed * (num_examples > 0)
  completed = completed * finite
  weights = client_weights(num_examples, completed, server.weighting)
  deltas = jax.tree.map(
      lambda d: jnp.where((weights > 0).reshape((-1,) + (1,) * (d.ndim - 1)), d,
                          jnp.zeros_like(d)), deltas)
  aggregator_key, _ = _server_keys(state)
  aggregate, aggregator_state, aggregator_metrics = server.aggregator.apply(
      state.aggregator_state, deltas, weights, aggregator_key)
  pseudo_grad = jax.tree.map(jnp.negative, aggregate)
  any_update = weights.sum() > 0
  metrics = {}
  if server.server_loss is not None:
    # the value only: a metric, no second gradient of f_c
    metrics["server_loss"] = server.server_loss(
        *_central_inputs(state, cohort, frozen))
    if server.mixing != "one_way":
      federated_grad = None
      if server.mixing == "two_way":  # the clients' gradients at x, averaged
        federated_grad = aggregators.weighted_mean(client_metrics["gradient"],
                                                   weights)
      pseudo_grad = optax.tree.sub(pseudo_grad, central_delta(
          state, cohort, server, federated_grad, frozen))
    any_update = jnp.asarray(True)
  new_state = server_update(state, pseudo_grad, any_update, server.optimizer)
  if server.personalise is not None:
    new_client_states, metrics_of_balance = server.personalise(
        new_client_states, state.params, deltas, client_metrics["loss"],
        weights, state.step)
    metrics.update(metrics_of_balance)
  # only clients that finished the round keep their new state
  keep = completed > 0
  rows = cohort["client_rows"]
  client_states = jax.tree.map(
      lambda table, new, old: table.at[rows].set(
          jnp.where(keep.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)),
      state.client_states, new_client_states, cohort_client_states(state, cohort))
  new_state = new_state.replace(
      aggregator_state=_select(any_update, aggregator_state,
                               state.aggregator_state),
      client_states=client_states)
  metrics.update({
      "client_loss": aggregators.weighted_mean(
          jnp.where(weights > 0, client_metrics["loss"], 0.0), weights),
      "clients_completed": jnp.sum(completed * (num_examples > 0)),
      "nonfinite_clients": jnp.sum(ran * (1 - finite)),
      "examples": jnp.sum(num_examples * completed),
      "delta_norm": optax.tree.norm(aggregate),
      **aggregator_metrics})
  return new_state, metrics


def make_round(example_loss: ExampleLoss, client: ClientSpec,
               server: ServerSpec, client_chunk: int = 0, client_shards: int = 1):
  """The vmapped round: `round(state, cohort, frozen=None) -> (state,
  metrics)`, pure, to jit (`frozen`: the module docstring).

  `client_chunk` > 0 trains the cohort `client_chunk` clients at a time
  (`lax.map` with a batch size: vmapped within a chunk, a loop across
  chunks), so one chunk's activations stay in cache on CPU; 0 vmaps the whole
  cohort at once. With `client_shards` > 1 (the mesh's data axis, over which
  the cohort is split in contiguous blocks) a chunk takes `client_chunk`
  clients from every shard, so every device trains its own clients at every
  step. The result is the same either way.
  """
  check_mixing(server)
  if client_chunk < 0:
    raise ConfigError(f"config.federated.client_chunk={client_chunk} must be >= 0")
  if client_shards < 1:
    raise ConfigError(f"client_shards={client_shards} must be >= 1")
  client_update = make_client_update(example_loss, client,
                                     federated_gradient=_two_way(server))

  def federated_round(state, cohort, frozen=None):
    server_grad = _sent_server_grad(state, cohort, server, frozen)
    per_client = (cohort_client_states(state, cohort), cohort["examples"],
                  cohort["num_examples"], client_rngs(state, cohort["client_ids"]))
    # the server's parameters and `frozen` are closed over: every client
    # reads the same arrays, only `per_client` is mapped over the cohort
    train = lambda xs: client_update(state.params, *xs, server_grad,  # noqa: E731
                                     frozen)
    if client_chunk:
      deltas, client_states, client_metrics = chunked_clients(
          train, per_client, client_chunk, client_shards)
    else:
      deltas, client_states, client_metrics = jax.vmap(train)(per_client)
    return finish_round(state, deltas, client_states, client_metrics, cohort,
                        server, frozen)

  return federated_round


def chunked_clients(train, per_client, chunk: int, shards: int = 1):
  """`train` mapped over the cohort's leading axis [n] in steps of `chunk`
  clients per shard (vmapped within a step, a loop across steps).

  The cohort is split over `shards` devices in contiguous blocks of n / shards
  clients, so the map runs over [n / shards, shards]: step i takes clients
  i*chunk..(i+1)*chunk-1 of every block, and every device trains its own
  clients at every step (consecutive clients would sit on one device while
  the others wait). Outputs come back in cohort order.
  """
  if shards == 1:
    return jax.lax.map(train, per_client, batch_size=chunk)
  n = jax.tree.leaves(per_client)[0].shape[0]
  if n % shards:
    raise ConfigError(f"{n} clients per round do not split over the mesh's "
                      f"{shards} data shards")
  by_shard = lambda x: jnp.swapaxes(x.reshape((shards, -1) + x.shape[1:]), 0, 1)  # noqa: E731
  in_order = lambda x: jnp.swapaxes(x, 0, 1).reshape((n,) + x.shape[2:])  # noqa: E731
  outputs = jax.lax.map(jax.vmap(train), jax.tree.map(by_shard, per_client),
                        batch_size=chunk)
  return jax.tree.map(in_order, outputs)


def check_mixing(server: ServerSpec) -> None:
  if server.mixing not in MIXINGS:
    raise ConfigError(f"config.federated.mixed.algorithm={server.mixing!r} is not "
                      f"one of {MIXINGS}")
  if server.central_steps < 1 or server.central_learning_rate <= 0:
    raise ConfigError("config.federated.mixed needs central_steps >= 1 and "
                      f"central_learning_rate > 0, got {server.central_steps} "
                      f"and {server.central_learning_rate}")


def _two_way(server: ServerSpec) -> bool:
  return server.server_loss is not None and server.mixing == "two_way"


def _sent_server_grad(state, cohort, server: ServerSpec, frozen=None):
  """g_c(x) for the clients (one_way, two_way), else None."""
  if server.server_loss is None or server.mixing == "parallel":
    return None
  return central_grad(state, cohort, server, frozen)


def make_looped_round(example_loss: ExampleLoss, client: ClientSpec,
                      server: ServerSpec):
  """The same round as a Python loop over clients calling one jitted
  `client_update`: what frameworks that simulate clients one by one do. Kept
  for the equality test and the throughput benchmark, not for training."""
  check_mixing(server)
  client_update = jax.jit(make_client_update(
      example_loss, client, federated_gradient=_two_way(server)))
  finish = jax.jit(lambda state, deltas, states, metrics, cohort, frozen:
                   finish_round(state, deltas, states, metrics, cohort, server,
                                frozen))
  rngs_of = jax.jit(client_rngs)
  states_of = jax.jit(cohort_client_states)
  server_grad_of = jax.jit(lambda state, cohort, frozen: _sent_server_grad(
      state, cohort, server, frozen))

  def looped_round(state, cohort, frozen=None):
    rngs = rngs_of(state, cohort["client_ids"])
    client_states = states_of(state, cohort)
    server_grad = server_grad_of(state, cohort, frozen)
    results = [client_update(state.params,
                             jax.tree.map(lambda x: x[c], client_states),
                             cohort["examples"][c], cohort["num_examples"][c],
                             rngs[c], server_grad, frozen)
               for c in range(cohort["num_examples"].shape[0])]
    deltas, states, metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
    return finish(state, deltas, states, metrics, cohort, frozen)

  return looped_round


def _optimizer(name: str, learning_rate: float, field: str,
               momentum: float = 0.0) -> optax.GradientTransformation:
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ConfigError(f"{field}={name!r} is not one of ('sgd', 'adam')")


def specs_from_config(fed: ml_collections.ConfigDict, dp_budget=None,
                      server_loss=None) -> tuple[ClientSpec, ServerSpec]:
  """ClientSpec and ServerSpec for `config.federated`.

  `fed.algorithm` picks the server optimiser (and, for fedsgd, the client
  procedure; for fedprox, requires `prox_mu` > 0). Adaptive server optimisers
  use eps=1e-3, the value Reddi et al. tune around. `fed.personalisation`
  ("fellrec") gives every client its own model (federated/personalisation.py).
  `dp_budget`
  (federated/privacy.budget) gives the `dp` aggregator its noise.
  `server_loss` (the task's f_c for `fed.mixed.server_loss`, or None) is
  joined by `fed.mixed` (algorithm, central_steps, central_learning_rate).
  """
  algorithm = fed.algorithm
  if algorithm not in ALGORITHMS:
    raise ConfigError(f"config.federated.algorithm={algorithm!r} is not one of "
                      f"{ALGORITHMS}")
  if not 0.0 <= fed.dropout_rate < 1.0:
    raise ConfigError("config.federated.dropout_rate must be in [0, 1), got "
                      f"{fed.dropout_rate}")
  if fed.weighting not in WEIGHTINGS:
    raise ConfigError(f"config.federated.weighting={fed.weighting!r} is not one of "
                      f"{WEIGHTINGS}")
  lr = fed.server_learning_rate or DEFAULT_SERVER_LEARNING_RATES[algorithm]
  if fed.prox_mu < 0:
    raise ConfigError(f"config.federated.prox_mu={fed.prox_mu} must be >= 0")
  if not 0.0 <= fed.server_momentum < 1.0:
    raise ConfigError("config.federated.server_momentum must be in [0, 1), got "
                      f"{fed.server_momentum}")
  server_tx = {
      "fedsgd": lambda: optax.sgd(lr),
      "fedavg": lambda: optax.sgd(lr),
      "fedprox": lambda: optax.sgd(lr),
      "fedavgm": lambda: optax.sgd(lr, momentum=fed.server_momentum),
      "fedadam": lambda: optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3),
      "fedyogi": lambda: optax.yogi(lr, b1=0.9, b2=0.99, eps=1e-3),
  }[algorithm]()
  if algorithm == "fedsgd":
    client = ClientSpec(optax.sgd(1.0), local_epochs=1, batch_size=None)
  else:
    if algorithm == "fedprox" and fed.prox_mu <= 0:
      raise ConfigError("config.federated.algorithm='fedprox' needs "
                        f"config.federated.prox_mu > 0, got {fed.prox_mu}")
    client = ClientSpec(
        _optimizer(fed.client_optimizer, fed.client_learning_rate,
                   "config.federated.client_optimizer", fed.client_momentum),
        local_epochs=fed.local_epochs, batch_size=fed.client_batch_size,
        terms=(proximal_term(fed.prox_mu),) if fed.prox_mu else ())
  server = ServerSpec(server_tx, weighting=fed.weighting,
                      dropout_rate=fed.dropout_rate,
                      aggregator=compression.compressed(
                          aggregators.from_config(fed, dp_budget),
                          compression.from_config(fed)))
  server = dataclasses.replace(  # the mixing fields are no-ops without f_c
      server, server_loss=server_loss, mixing=fed.mixed.algorithm,
      central_steps=fed.mixed.central_steps,
      central_learning_rate=fed.mixed.central_learning_rate)
  check_mixing(server)
  personal = personalisation.from_config(fed)
  if personal is not None:
    client = dataclasses.replace(client, state_init=personal.state_init,
                                 start=personal.start)
    server = dataclasses.replace(server, personalise=personal.personalise)
  return client, server
