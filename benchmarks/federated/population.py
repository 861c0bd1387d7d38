"""Federated next-item training at populations of 10^3 to 10^5+ clients: the
time and peak memory of each stage, and the trained model's quality on a
sample of clients with its standard error.

  python -m benchmarks.federated.population --out benchmarks/results/population

Each population is `configs/fedavg.py` (FedAdam, one client per synthetic
user) with `config.data.synthetic.num_users` users, run in a fresh process
(so its peak RSS is its own) through the workflow's own stages
(federated/workflow.py: build, the round program, train, evaluate):

- data: generating the users' timelines (data/synthetic.py, users simulated
  in chunks, so memory is bounded by the chunk, not the population);
- clients: the participation split and every participating client's packed
  training windows (no Python loop over users or clients);
- a round: `--cohort` clients (1,000 by default) trained through the chunked
  vmapped round, its median wall time over timed rounds after compiling;
- train: `--rounds` rounds under the shared loop (checkpointed as any run);
- evaluate: `--eval_clients` participating and as many non-participating
  clients (config.federated.eval_clients), every held-out event of each
  scored by full ranking.

Nothing is chosen: every population runs at configs/fedavg.py's settings
with the cohort and rounds of the flags, so the quality column shows what a
fixed budget of rounds buys at each size, not each size's best model.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks import harness
from infra import results

FLAGS = (
    harness.Flag("users", ["1000", "10000", "100000"], "Populations, one row each."),
    harness.Flag("cohort", 1000, "Clients per round (at most the participating "
                 "clients)."),
    harness.Flag("rounds", 100, "Rounds trained before the evaluation."),
    harness.Flag("eval_clients", 1000, "Clients evaluated per split."),
    harness.Flag("timed_rounds", 5, "Rounds timed after the compiling one."),
)
METRIC = "recall@10"
# a population's process: users, cohort, rounds, eval_clients, timed_rounds
_CELL = """
import sys
from benchmarks.federated import population
population.cell(*[int(a) for a in sys.argv[1:]])
"""


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config_of(users: int, cohort: int, rounds: int, eval_clients: int):
  from configs import fedavg
  config = fedavg.get_config()
  config.data.synthetic.num_users = users
  participating = int(round(config.federated.participating_fraction * users))
  config.federated.update(clients_per_round=min(cohort, participating),
                          eval_clients=eval_clients)
  config.train.update(num_steps=rounds, log_every=max(rounds // 4, 1),
                      eval_every=0, checkpoint_every=rounds)
  return config


def cell(users: int, cohort: int, rounds: int, eval_clients: int,
         timed_rounds: int) -> None:
  """One population in this process (a fresh one): prints one JSON line."""
  import jax
  from federated import workflow
  from infra import mesh as mesh_lib, train_loop
  config = config_of(users, cohort, rounds, eval_clients)
  mesh = mesh_lib.make_mesh(config.mesh)
  row = {"users": users}
  began = time.perf_counter()
  from data import sources
  timelines = sources.load_timelines(config.data, quiet=True)
  row.update(data_seconds=time.perf_counter() - began, events=timelines.num_events,
             items=timelines.num_items, data_peak_rss_mib=_peak_rss_mib())
  began = time.perf_counter()
  f = workflow.build(config, mesh, timelines)
  row.update(clients_seconds=time.perf_counter() - began,
             clients=len(f.split.participating),
             participating_clients=int(f.split.participating.sum()),
             training_windows=int(f.dataset.num_examples.sum()),
             cohort=config.federated.clients_per_round,
             clients_peak_rss_mib=_peak_rss_mib())
  state, _, round_fn, sampler = workflow.round_program(config, mesh, f)
  row["round_seconds"] = train_loop.step_seconds(
      round_fn, state, mesh_lib.put_batch(sampler(0), mesh), repeats=timed_rounds)
  del state
  with tempfile.TemporaryDirectory() as workdir:
    began = time.perf_counter()
    state = workflow.train(config, workdir, mesh, f)
    row["train_seconds"] = time.perf_counter() - began
  began = time.perf_counter()
  metrics = workflow.evaluate(config, mesh, f, state)
  row["eval_seconds"] = time.perf_counter() - began
  row["rounds"] = int(jax.device_get(state.step))
  for split in ("out_of_sample", "non_participating"):
    for scorer in ("model", "popularity"):
      for stat in ("mean", "stderr"):
        row[f"{split}/{scorer}/{stat}"] = metrics[
            f"{split}/{scorer}/next_item/{METRIC}_{stat}"]
    row[f"{split}/clients"] = metrics[f"{split}/model/next_item/clients"]
  for stat in ("", "_stderr"):
    row[f"participation_gap{stat}"] = metrics[
        f"participation_gap/model/next_item/{METRIC}{stat}"]
  row["peak_rss_mib"] = _peak_rss_mib()
  print(json.dumps(row), flush=True)


def _run_cell(users: int, args) -> dict:
  command = [sys.executable, "-c", _CELL, str(users), str(args.cohort),
             str(args.rounds), str(args.eval_clients), str(args.timed_rounds)]
  out = subprocess.run(command, capture_output=True, text=True, cwd=harness.REPO,
                       env={**os.environ, "PYTHONPATH": harness.REPO})
  if out.returncode:
    raise RuntimeError(f"{users} users failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def measure(run: harness.Run) -> dict:
  rows = []
  for users in (int(n) for n in run.args.users):
    row = _run_cell(users, run.args)
    print(f"{users:8d} users: data {row['data_seconds']:.0f} s, clients "
          f"{row['clients_seconds']:.0f} s, round {row['round_seconds']:.2f} s "
          f"({row['cohort']} clients), peak RSS {row['peak_rss_mib']:.0f} MiB, "
          f"{METRIC} {row['out_of_sample/model/mean']:.3f}", flush=True)
    rows.append(row)
  return {"metric": METRIC, "cpu_count": os.cpu_count(), "rows": rows}


def present(payload: dict):
  rows, metric = payload["rows"], payload["metric"]

  def mean_se(row, key):
    return f"{row[f'{key}/mean']:.3f} ± {row[f'{key}/stderr']:.3f}"

  lines = [
      f"configs/fedavg.py (FedAdam) on synthetic users, {payload['cpu_count']} "
      "CPU cores, one process per population. Seconds: generating the data; "
      "building the clients (participation split, packed windows); one round "
      "of the cohort (median after compiling); the rounds trained; scoring "
      "the sampled clients. Peak RSS: the process's, after the data / after "
      f"the clients / at the end. {metric}: per-client mean over the sampled "
      "clients ± its standard error (out-of-sample: participating clients' "
      "held-out events; the participation gap: out-of-sample minus "
      "non-participating).", ""]
  lines += results.markdown_table(
      ["users", "events", "data s", "clients s", "cohort", "round s",
       "clients / s", "rounds", "train s", "eval s (clients)",
       "peak RSS MiB (data / clients / end)", f"out-of-sample {metric}",
       "popularity", "participation gap"],
      [[f"{r['users']:,}", f"{r['events']:,}", f"{r['data_seconds']:.1f}",
        f"{r['clients_seconds']:.1f}", r["cohort"], f"{r['round_seconds']:.2f}",
        f"{r['cohort'] / r['round_seconds']:.0f}", r["rounds"],
        f"{r['train_seconds']:.0f}",
        f"{r['eval_seconds']:.0f} ({int(r['out_of_sample/clients'])} + "
        f"{int(r['non_participating/clients'])})",
        f"{r['data_peak_rss_mib']:.0f} / {r['clients_peak_rss_mib']:.0f} / "
        f"{r['peak_rss_mib']:.0f}",
        mean_se(r, "out_of_sample/model"), mean_se(r, "out_of_sample/popularity"),
        f"{r['participation_gap']:+.3f} ± {r['participation_gap_stderr']:.3f}"]
       for r in rows])
  return lines, plot(rows)


def plot(rows: list[dict]):
  from benchmarks import plots
  fig, (memory, seconds) = plots.panels(2)
  users = [r["users"] for r in rows]
  for key, label in (("data_peak_rss_mib", "after the data"),
                     ("clients_peak_rss_mib", "after the clients"),
                     ("peak_rss_mib", "at the end")):
    memory.plot(users, [r[key] for r in rows], "o-", label=label)
  memory.set(xscale="log", yscale="log", xlabel="users (clients)",
             ylabel="peak RSS (MiB)", title="memory")
  for key, label in (("data_seconds", "data"), ("clients_seconds", "clients"),
                     ("round_seconds", "one round"), ("eval_seconds", "evaluation")):
    seconds.plot(users, [r[key] for r in rows], "o-", label=label)
  seconds.set(xscale="log", yscale="log", xlabel="users (clients)",
              ylabel="seconds", title="time per stage")
  for ax in (memory, seconds):
    ax.legend(fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
