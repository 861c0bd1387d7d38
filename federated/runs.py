"""What the federated workflows (federated/workflow.py, the task models;
federated/llm_workflow.py, adapters of a frozen LLM) share when they run a
round: the line describing the clients, the DP-FedAvg budget and the
privacy spent, how many clients train at once on this machine, each
client's own model (FELLRec), and mixed FL's server data (`check_server_data`,
`cohorts`)."""

from __future__ import annotations

import jax
import numpy as np

from federated import algorithms, clients, privacy
from infra import mesh as mesh_lib
from infra.errors import ConfigError


def clients_and_specs(config, timelines, task, mesh):
  """What every federated workflow builds from its data and task: (split,
  dataset, DP budget or None, client spec, server spec), the clients
  described in one line and the batch sizes checked against the mesh."""
  fed = config.federated
  split, dataset = clients.build_clients(fed, timelines, task.client_examples,
                                         config.seed)
  describe_clients(fed, split, dataset)
  check_server_data(fed, dataset, mesh)
  mesh_lib.check_batch_divides(fed.clients_per_round, mesh,
                               "config.federated.clients_per_round")
  mesh_lib.check_batch_divides(config.train.eval_batch_size, mesh,
                               "config.train.eval_batch_size")
  budget = dp_budget(config, len(dataset))
  client_spec, server_spec = algorithms.specs_from_config(
      fed, budget, task.server_loss(fed.mixed.server_loss, fed.mixed.weight))
  return split, dataset, budget, client_spec, server_spec


def describe_clients(fed, split: clients.ParticipationSplit,
                     dataset: clients.ClientDataset) -> None:
  """The `[clients]` line: how many, how many participate, their examples."""
  print(f"[clients] {len(split.participating)} {fed.partition} clients, "
        f"{int(split.participating.sum())} participating; "
        f"{int(dataset.num_examples.sum())} training examples, up to "
        f"{dataset.examples.shape[1]} per client"
        + (f" ({dataset.num_capped} left out by max_examples_per_client)"
           if dataset.num_capped else ""), flush=True)


def dp_budget(config, num_clients: int) -> privacy.Budget | None:
  """DP-FedAvg's budget (`config.federated.aggregator = "dp"`), accounted over
  the `num_clients` the cohorts come from for `config.train.num_steps`
  rounds, said in one `[privacy]` line; None without DP."""
  fed = config.federated
  if fed.aggregator != "dp":
    return None
  if "dp" not in fed:
    raise ConfigError("config.federated.aggregator='dp' needs a "
                      "config.federated.dp section (configs/dp_fedavg.py has one)")
  budget = privacy.budget(fed, num_clients, config.train.num_steps)
  print(f"[privacy] DP-FedAvg: clip {fed.dp.clip_norm:g}, noise multiplier "
        f"{budget.noise_multiplier:.4g}, q={budget.sampling_probability:.4g}"
        f"; epsilon {budget.epsilon(config.train.num_steps):.4g} at delta "
        f"{fed.dp.delta:g} after {config.train.num_steps} rounds "
        f"({fed.dp.accountant})", flush=True)
  return budget


# Clients in flight per round step on a CPU host, all its devices together:
# on one device 8 beats 32 for both model sizes of benchmarks/federated_round.md
# (and ties 4 for the 46k model); on two, 1 to 4 per device tie.
CPU_CLIENT_CHUNK = 8


def resolve_client_chunk(requested: int, mesh) -> int:
  """`config.federated.client_chunk` (clients per data shard per step), with
  -1 (auto) resolved for this machine: on CPU, CPU_CLIENT_CHUNK shared out
  over the mesh's data shards (a host split into one device per core, e.g.
  JAX_NUM_CPU_DEVICES=$(nproc), trains a chunk on every core at once); on
  accelerators 0, the whole cohort in one vmap (they have the memory and
  parallelism for it)."""
  if requested < -1:
    raise ConfigError(f"config.federated.client_chunk={requested} must be -1 "
                      "(auto), 0 (whole cohort) or a chunk size")
  if requested >= 0:
    return requested
  if mesh.devices.flat[0].platform != "cpu":
    return 0
  return max(1, CPU_CLIENT_CHUNK // mesh.shape["data"])


def personal_models(state, dataset: clients.ClientDataset):
  """client id -> its own parameters (FELLRec) or None; None when the run
  keeps no per-client models."""
  states = state.client_states
  if not isinstance(states, dict) or "params" not in states:
    return None
  row_of_client = {int(c): r for r, c in enumerate(dataset.client_ids)}
  trained = mesh_lib.to_host(states["trained"])

  def client_params(client_id: int):
    row = row_of_client.get(client_id)
    if row is None or not trained[row]:
      return None
    return jax.tree.map(lambda table: table[row], states["params"])

  return client_params


def privacy_spent(dp_budget, rounds) -> dict[str, float]:
  """{"dp_epsilon", "dp_delta", "dp_noise_multiplier"} after `rounds`; {}
  without DP."""
  if dp_budget is None:
    return {}
  return {"dp_epsilon": dp_budget.epsilon(int(rounds)), "dp_delta": dp_budget.delta,
          "dp_noise_multiplier": dp_budget.noise_multiplier}


def check_server_data(fed, dataset: clients.ClientDataset, mesh) -> None:
  """The datacenter server loss needs server data, a batch it can draw."""
  held = 0 if dataset.server_examples is None else len(dataset.server_examples)
  if held:
    print(f"[clients] the server holds {held} examples "
          f"(datacenter.users={fed.datacenter.users!r}"
          f"{', swapped' if fed.datacenter.swap else ''})", flush=True)
  if fed.mixed.server_loss != "datacenter":
    return
  size = fed.datacenter.server_batch_size
  if not 1 <= size <= held:
    raise ConfigError(
        f"config.federated.datacenter.server_batch_size={size} must be between 1 "
        f"and the server's {held} examples (config.federated.datacenter.users "
        "gives the server data)")
  mesh_lib.check_batch_divides(size, mesh,
                               "config.federated.datacenter.server_batch_size")


def cohorts(config, f):
  """round -> the cohort of that round; with a server loss, the cohort also
  carries its `server_batch`: `datacenter.server_batch_size` of the server's
  examples drawn as a pure function of (seed, round), or, for a loss of the
  parameters alone, a zero placeholder with one row per client (so it shards
  like the cohort)."""
  fed = config.federated
  sampler = clients.CohortSampler(f.dataset, fed.clients_per_round, config.seed)
  if f.server_spec.server_loss is None:
    return sampler
  held = f.dataset.server_examples
  if fed.mixed.server_loss != "datacenter":
    placeholder = np.zeros((fed.clients_per_round,), np.float32)
    return lambda round_index: {**sampler(round_index), "server_batch": placeholder}
  size = fed.datacenter.server_batch_size

  def with_server_batch(round_index):
    rng = np.random.default_rng([config.seed, 4, round_index])
    rows = np.sort(rng.choice(len(held), size, replace=False))
    return {**sampler(round_index), "server_batch": held[rows]}

  return with_server_batch
