"""Workflow `federated`: a task model (federated/tasks.py: the next-item
transformer or the retrieval dual encoder) trained by a FedAvg-family
algorithm over clients, optionally with a server-side loss (mixed FL:
`config.federated.mixed`, server data from `config.federated.datacenter`),
and evaluated for the participation gap; results.json also gets each client's
bytes and FLOPs per round (federated/cost.py).

Clients are users (`config.federated.partition = "natural"`, one client per
user), or groups of users synthesised by `dirichlet` (label skew on each user's
favourite genre) or `semantic` (GMM clusters of user embeddings per favourite
genre, matched across genres). A round is `algorithms.make_round`; the shared
train loop (`infra.train_loop.fit`) drives it, so rounds are checkpointed,
resumed, logged and evaluated exactly like steps of centralised training
(`config.train` is the loop's schedule, counted in rounds).
`config.federated.pooling` = "central" trains centrally through the same round
(one client holding every example), "iid" deals the examples at random. With
`config.federated.personalisation = "fellrec"` every client that trained is
evaluated with its own model (the rest with the server's).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from data import sources
from federated import (algorithms, clients, cost, evaluation, privacy, runs,
                       tasks)
from federated.runs import (CPU_CLIENT_CHUNK, personal_models,  # noqa: F401
                            privacy_spent, resolve_client_chunk)
from infra import train_loop


def init_state(task, client: algorithms.ClientSpec, server: algorithms.ServerSpec,
               seed: int, num_client_rows: int, mesh):
  """(ServerState, shardings) on `mesh`; the per-client table's rows (padded
  to a multiple of the data axis) shard over `data`."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  data = mesh.shape["data"]
  rows = -(-num_client_rows // data) * data

  def boxed_state():
    params = task.init_params(init_rng)
    state = algorithms.init_server_state(nn.meta.unbox(params), client, server,
                                         train_rng, rows)
    box = lambda x: nn.LogicallyPartitioned(  # noqa: E731
        x, ("clients",) + (None,) * (x.ndim - 1))
    return state.replace(params=params,
                         opt_state=server.optimizer.init(params),
                         client_states=jax.tree.map(box, state.client_states))

  return train_loop.init_sharded(boxed_state, mesh)


@dataclasses.dataclass
class Federation:
  """What a federated run builds before it trains (the benchmarks reuse it
  to attack the trained model)."""
  timelines: Any
  task: Any
  split: clients.ParticipationSplit
  dataset: clients.ClientDataset
  dp_budget: privacy.Budget | None
  client_spec: algorithms.ClientSpec
  server_spec: algorithms.ServerSpec


def build(config: ml_collections.ConfigDict, mesh, timelines=None) -> Federation:
  """Data (`timelines` if given), task, clients, privacy budget and the
  round's specs of `config`."""
  if timelines is None:
    timelines = sources.load_timelines(config.data)
  task = tasks.from_config(config, timelines)
  split, dataset, dp_budget, client_spec, server_spec = runs.clients_and_specs(
      config, timelines, task, mesh)
  return Federation(timelines, task, split, dataset, dp_budget, client_spec,
                    server_spec)


def round_program(config: ml_collections.ConfigDict, mesh, f: Federation):
  """(initial state, its shardings, round_fn, cohort sampler) of `f`: what
  `train` drives, and what the benchmarks time."""
  state, shardings = init_state(f.task, f.client_spec, f.server_spec, config.seed,
                                len(f.dataset), mesh)
  round_fn = algorithms.make_round(f.task.example_loss, f.client_spec,
                                   f.server_spec,
                                   client_chunk=resolve_client_chunk(
                                       config.federated.client_chunk, mesh),
                                   client_shards=mesh.shape["data"])
  return state, shardings, round_fn, runs.cohorts(config, f)


def train(config: ml_collections.ConfigDict, workdir: str, mesh, f: Federation):
  """Rounds of `f`'s algorithm under the shared loop; the final ServerState."""
  state, shardings, round_fn, sampler = round_program(config, mesh, f)
  periodic = evaluation.ParticipationGapEvaluator(  # participating clients' means
      f.task, f.timelines, f.split, config.train.eval_batch_size, mesh,
      splits=("out_of_sample",), full_summary=False)
  return train_loop.fit(state=state, state_shardings=shardings,
                        train_step=round_fn, batch_fn=sampler, mesh=mesh,
                        workdir=workdir, schedule=config.train,
                        eval_fn=lambda s: {
                            **periodic.evaluate(s.params,
                                                personal_models(s, f.dataset)),
                            **privacy_spent(f.dp_budget, s.step)},
                        name="federated", unit="round", identity=config.to_dict())


def evaluate(config: ml_collections.ConfigDict, mesh, f: Federation, state
             ) -> dict[str, float]:
  """The participation-gap evaluation of a trained state (with baselines)."""
  final = evaluation.ParticipationGapEvaluator(
      f.task, f.timelines, f.split, config.train.eval_batch_size, mesh,
      f.task.baselines(f.split.train, config.seed))
  out = final.evaluate(state.params, personal_models(state, f.dataset))
  out.update(privacy_spent(f.dp_budget, state.step))
  return out


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, float]:
  """Federated training + participation-gap evaluation; metrics for results.json."""
  began = time.time()
  f = build(config, mesh)
  train_began = time.time()
  state = train(config, workdir, mesh, f)
  results = {"train_seconds": time.time() - train_began, "rounds": int(state.step),
             "num_clients": len(f.split.participating),
             "participating_clients": int(f.split.participating.sum()),
             "training_examples": int(f.dataset.num_examples.sum())}
  results.update(evaluate(config, mesh, f, state))
  results.update(cost.round_cost(f.task, f.client_spec, state, f.dataset))
  results["wall_seconds"] = time.time() - began
  return results
