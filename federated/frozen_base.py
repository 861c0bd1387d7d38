"""A federated round over adapters of a frozen base model: the base weights
held once, the adapters the round's parameters.

An LLM with adapters (userllm/models/adapters.py) has one parameter tree
whose `<target>_adapter` subtrees are the adapters; `adapters.split_adapters`
takes them out (the round's `params`: what clients train, send and the server
aggregates) and leaves the base (`frozen`), and `adapters.merge_adapters` puts
them back for the forward pass. The round's state, `FrozenBaseState`, is the ServerState
with the base beside it: the training loop (infra/train_loop.fit) jits
`round_step(round)`, which hands `state.frozen` to the round as its frozen
argument (federated/algorithms.py), so the base is an argument of the one
jitted computation, laid out over the mesh's `model` axis by its logical
axes, closed over by the vmapped client function and never copied per
client. A round never writes it: it goes out as it came in (and with the
state donated, XLA aliases the two buffers). Checkpoints hold it with the
rest of the state, so a resumed run needs nothing else.

`compiled_memory` reads what a round needs from XLA's compiled memory
analysis (arguments, outputs, temporaries), so what a client costs can be
measured rather than assumed (tests/test_federated_llm.py, the benchmark).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
from flax import linen as nn

from federated import algorithms
from infra import train_loop
from userllm.models import adapters as adapters_lib

PyTree = Any


@flax.struct.dataclass
class FrozenBaseState(algorithms.ServerState):
  """A ServerState whose `params` are the adapters, with `frozen`: the base
  weights every client reads and no round changes."""
  frozen: PyTree = None


def round_step(federated_round):
  """`step(state, cohort)` for the training loop: `federated_round(state,
  cohort, state.frozen)` (algorithms.make_round's frozen argument)."""

  def step(state: FrozenBaseState, cohort):
    return federated_round(state, cohort, state.frozen)

  return step


def init_state(boxed_params_fn, client: algorithms.ClientSpec,
               server: algorithms.ServerSpec, seed: int, num_client_rows: int,
               mesh, split=adapters_lib.split_adapters):
  """(FrozenBaseState, shardings) on `mesh`: `boxed_params_fn(rng)` (the
  model's whole tree with logical axis names) split by `split` into what the
  clients train (the round's params: by default the adapters; their
  optimiser state and per-client table too, the table's rows padded to a
  multiple of the data axis and sharded over it) and the frozen rest
  (`frozen`, sharded by its logical axes: `vocab`, `mlp`, `heads` over
  `model`)."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  data = mesh.shape["data"]
  rows = -(-num_client_rows // data) * data

  def boxed_state():
    adapter_part, base_part = split(boxed_params_fn(init_rng))
    state = algorithms.init_server_state(nn.meta.unbox(adapter_part), client,
                                         server, train_rng, rows)
    box = lambda x: nn.LogicallyPartitioned(  # noqa: E731
        x, ("clients",) + (None,) * (x.ndim - 1))
    return FrozenBaseState(
        step=state.step, params=adapter_part,
        opt_state=server.optimizer.init(adapter_part), rng=state.rng,
        aggregator_state=state.aggregator_state,
        client_states=jax.tree.map(box, state.client_states), frozen=base_part)

  return train_loop.init_sharded(boxed_state, mesh)


def tree_bytes(tree: PyTree) -> int:
  """Bytes of every array leaf of `tree` (shapes only: abstract trees too)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def compiled_memory(fn, *args, **jit_kwargs) -> dict[str, int]:
  """XLA's compiled memory of `jax.jit(fn, **jit_kwargs)(*args)`: {argument,
  output, alias, temp} bytes (per device on a mesh: what one device holds)."""
  stats = jax.jit(fn, **jit_kwargs).lower(*args).compile().memory_analysis()
  return {"argument": int(stats.argument_size_in_bytes),
          "output": int(stats.output_size_in_bytes),
          "alias": int(stats.alias_size_in_bytes),
          "temp": int(stats.temp_size_in_bytes)}
