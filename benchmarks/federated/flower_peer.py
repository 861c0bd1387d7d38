"""The round benchmark's peer: the same FedAvg round simulated in Flower.

Runs in its own environment (Flower pins protobuf < 7, which the main stack's
sentencepiece/TensorFlow cannot load), made with

  python -m venv .venv-flower
  .venv-flower/bin/pip install -r requirements-peers.txt

and started by `benchmarks.federated.federated_round --flower_python=.venv-flower/bin/python`,
one process per (size, clients) cell:

  .venv-flower/bin/python -m benchmarks.federated.flower_peer --size tiny --clients 64 \
      --rounds 5 --params_out /tmp/flower.npz

Every client runs the project's own jitted single-client update
(`federated.algorithms.make_client_update`) on the same examples, with the same
per-client key, as the vmapped round; Flower's message-based FedAvg strategy
averages the returned parameters (weighted by example count) in its Ray
simulation engine, one CPU per client actor. So the two differ only in how
clients are simulated, and their server models after the same rounds must agree
to float tolerance (`federated_round` checks it).

The ClientApp lives in this module, not in `__main__`, and builds its jitted
update lazily once per actor process: a jitted function captured by a ClientApp
defined in `__main__` is pickled to every call and recompiled per client.

Prints one JSON line: clients/s over the timed rounds (the first round, which
compiles in every actor, is excluded), the peak total RSS of the process tree
(driver, Ray daemons and actors), and the server loss.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import types

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

_SETUPS: dict = {}  # (size, clients) -> this actor's model, data and jitted update


def _client_setup(size: str, num_clients: int):
  """(initial server state, cohort, jitted client update), built once per process."""
  key = (size, num_clients)
  if key not in _SETUPS:
    import jax
    from benchmarks.federated import federated_round
    from federated import algorithms
    state, cohort, example_loss, client, _, _ = federated_round.setup(size,
                                                                      num_clients)
    update = jax.jit(algorithms.make_client_update(example_loss, client))
    _SETUPS[key] = (state, jax.device_get(cohort), update)
  return _SETUPS[key]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
  """One client's local epoch from the server's arrays; replies with its new arrays."""
  import jax
  import jax.numpy as jnp
  from federated import algorithms
  config = msg.content["config"]
  state, cohort, update = _client_setup(str(config["size"]), int(config["clients"]))
  cid = int(context.node_config["partition-id"])
  leaves, treedef = jax.tree.flatten(state.params)
  arrays = msg.content["arrays"].to_numpy_ndarrays()
  params = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays])
  # the vmapped round's key for this client in this round (state.step = round - 1)
  round_state = types.SimpleNamespace(rng=state.rng, step=int(config["server-round"]) - 1)
  rng = algorithms.client_rngs(round_state, jnp.asarray([cid], jnp.int32))[0]
  delta, _, metrics = update(params, (), cohort["examples"][cid],
                             cohort["num_examples"][cid], rng)
  new_params = jax.tree.map(lambda p, d: np.asarray(p + d), params, delta)
  del leaves
  reply = RecordDict({
      "arrays": ArrayRecord(jax.tree.leaves(new_params)),
      "metrics": MetricRecord({"num-examples": int(cohort["num_examples"][cid]),
                               "loss": float(metrics["loss"])})})
  return Message(reply, reply_to=msg)


class _TimedFedAvg(FedAvg):
  """FedAvg that records when each round's aggregation finishes."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.round_ends: list[float] = []

  def aggregate_train(self, server_round, replies):
    replies = list(replies)
    errors = [r.error for r in replies if r.has_error()]
    if errors:
      raise RuntimeError(f"round {server_round}: {len(errors)} clients failed: "
                         f"{errors[0]}")
    out = super().aggregate_train(server_round, replies)
    self.round_ends.append(time.perf_counter())
    return out


def _tree_rss_mib(root: int) -> float:
  """Total RSS (MiB) of `root` and all its descendants, from /proc."""
  parents, rss = {}, {}
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      parents[int(pid)] = int(fields[1])
      rss[int(pid)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
      continue
  tree, frontier = {root}, [root]
  while frontier:
    parent = frontier.pop()
    children = [p for p, pp in parents.items() if pp == parent and p not in tree]
    tree.update(children)
    frontier += children
  return sum(rss.get(p, 0) for p in tree) / 2**20


def run(size: str, num_clients: int, rounds: int, params_out: str) -> dict:
  """Runs 1 + `rounds` FedAvg rounds in Flower's simulation engine."""
  import jax
  state, _, _ = _client_setup(size, num_clients)
  result: dict = {}
  peak = [0.0]
  done = threading.Event()

  def sample_memory():
    while not done.is_set():
      peak[0] = max(peak[0], _tree_rss_mib(os.getpid()))
      done.wait(0.25)

  server_app = ServerApp()

  @server_app.main()
  def main(grid: Grid, context: Context) -> None:
    del context
    strategy = _TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                            min_train_nodes=num_clients,
                            min_available_nodes=num_clients)
    out = strategy.start(grid=grid, num_rounds=1 + rounds,
                         initial_arrays=ArrayRecord(
                             [np.asarray(x) for x in jax.tree.leaves(state.params)]),
                         train_config=ConfigRecord({"size": size,
                                                    "clients": num_clients}))
    result["arrays"] = out.arrays.to_numpy_ndarrays()
    result["round_ends"] = strategy.round_ends
    result["loss"] = out.train_metrics_clientapp[1 + rounds]["loss"]

  sampler = threading.Thread(target=sample_memory, daemon=True)
  sampler.start()
  began = time.perf_counter()
  run_simulation(server_app=server_app, client_app=client_app,
                 num_supernodes=num_clients,
                 backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                 "init_args": {"num_cpus": os.cpu_count(),
                                               "include_dashboard": False}})
  total = time.perf_counter() - began
  done.set()
  sampler.join()
  if "arrays" not in result:
    raise RuntimeError("the Flower simulation ended without a result")
  np.savez(params_out, *result["arrays"])
  ends = result["round_ends"]
  seconds = (ends[-1] - ends[0]) / rounds
  return {"size": size, "mode": "flower", "clients": num_clients,
          "rounds_timed": rounds, "round_seconds": seconds,
          "clients_per_second": num_clients / seconds,
          "first_round_seconds": float("nan"), "simulation_seconds": total,
          "peak_rss_mib": peak[0], "client_loss": float(result["loss"]),
          "flwr": __import__("flwr").__version__}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", required=True)
  parser.add_argument("--clients", type=int, required=True)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--params_out", required=True)
  args = parser.parse_args()
  # run through the importable module, so that Ray pickles the apps by reference
  from benchmarks.federated import flower_peer
  print(json.dumps(flower_peer.run(args.size, args.clients, args.rounds,
                                   args.params_out)))


if __name__ == "__main__":
  main()
