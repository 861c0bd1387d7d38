"""Workflow `federated`: a task model (federated/tasks.py; the next-item
transformer today) trained by a FedAvg-family algorithm over clients and
evaluated for the participation gap.

Clients are users (`config.federated.partition = "natural"`, one client per
user), or groups of users synthesised by `dirichlet` (label skew on each user's
favourite genre) or `semantic` (GMM clusters of user embeddings per favourite
genre, matched across genres). A round is `algorithms.make_round`; the shared
train loop (`infra.train_loop.fit`) drives it, so rounds are checkpointed,
resumed, logged and evaluated exactly like steps of centralised training
(`config.train` is the loop's schedule, counted in rounds).
"""

from __future__ import annotations

import time

import jax
import ml_collections
from flax import linen as nn

from data import sources
from federated import algorithms, clients, evaluation, privacy, tasks
from infra import mesh as mesh_lib, train_loop


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


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, float]:
  """Federated training + participation-gap evaluation; metrics for results.json."""
  began = time.time()
  fed = config.federated
  timelines = sources.load_timelines(config.data)
  task = tasks.from_config(config, timelines)
  split, dataset = clients.build_clients(fed, timelines, task.client_examples,
                                         config.seed)
  print(f"[clients] {len(split.participating)} {fed.partition} clients, "
        f"{int(split.participating.sum())} participating; "
        f"{int(dataset.num_examples.sum())} training examples, up to "
        f"{dataset.examples.shape[1]} per client"
        + (f" ({dataset.num_capped} left out by max_examples_per_client)"
           if dataset.num_capped else ""), flush=True)

  mesh_lib.check_batch_divides(fed.clients_per_round, mesh,
                               "config.federated.clients_per_round")
  mesh_lib.check_batch_divides(config.train.eval_batch_size, mesh,
                               "config.train.eval_batch_size")
  dp_budget = None
  if fed.aggregator == "dp":  # accounted over the clients the cohorts come from
    dp_budget = privacy.budget(fed, len(dataset), config.train.num_steps)
    print(f"[privacy] DP-FedAvg: clip {fed.dp.clip_norm:g}, noise multiplier "
          f"{dp_budget.noise_multiplier:.4g}, q={dp_budget.sampling_probability:.4g}"
          f"; epsilon {dp_budget.epsilon(config.train.num_steps):.4g} at delta "
          f"{fed.dp.delta:g} after {config.train.num_steps} rounds "
          f"({fed.dp.accountant})", flush=True)
  client_spec, server_spec = algorithms.specs_from_config(fed, dp_budget)
  state, shardings = init_state(task, client_spec, server_spec, config.seed,
                                len(dataset), mesh)
  round_fn = algorithms.make_round(task.example_loss, client_spec, server_spec)
  sampler = clients.CohortSampler(dataset, fed.clients_per_round, config.seed)

  baselines = task.baselines(split.train, config.seed)
  final = evaluation.ParticipationGapEvaluator(
      task, timelines, split, config.train.eval_batch_size, mesh, baselines)
  periodic = evaluation.ParticipationGapEvaluator(  # participating clients' means
      task, timelines, split, config.train.eval_batch_size, mesh,
      splits=("out_of_sample",), full_summary=False)

  train_began = time.time()
  state = train_loop.fit(state=state, state_shardings=shardings,
                         train_step=round_fn, batch_fn=sampler, mesh=mesh,
                         workdir=workdir, schedule=config.train,
                         eval_fn=lambda s: {**periodic.evaluate(s.params),
                                            **privacy_spent(dp_budget, s.step)},
                         name="federated", unit="round", identity=config.to_dict())
  results = {"train_seconds": time.time() - train_began, "rounds": int(state.step),
             "num_clients": len(split.participating),
             "participating_clients": int(split.participating.sum()),
             "training_examples": int(dataset.num_examples.sum())}
  results.update(final.evaluate(state.params))
  results.update(privacy_spent(dp_budget, state.step))
  results["wall_seconds"] = time.time() - began
  return results


def privacy_spent(dp_budget, rounds) -> dict[str, float]:
  """{"dp_epsilon", "dp_delta", "dp_noise_multiplier"} after `rounds`; {}
  without DP."""
  if dp_budget is None:
    return {}
  return {"dp_epsilon": dp_budget.epsilon(int(rounds)), "dp_delta": dp_budget.delta,
          "dp_noise_multiplier": dp_budget.noise_multiplier}
