"""Next-item parity with RecBole's SASRec, side by side on the same events
(issue 42, item 2): our item-sequence transformer (the next_item workflow at
each data set's config) and RecBole 1.2.1's SASRec with full-softmax
cross-entropy, trained in RecBole's own environment
(benchmarks/userllm/recbole_runner.py, requirements-recbole.txt), both
scored by our metric.

  python -m venv .venv-recbole && .venv-recbole/bin/pip install -r requirements-recbole.txt
  python -m benchmarks.userllm.recbole_peer --out benchmarks/results/recbole_peer

Protocol:
- The split is the next_item workflow's leave-last-out (valid: each user's
  second-to-last event, test: the last). RecBole reads the same timelines as
  an atomic .inter file whose timestamp is the event's index, and its
  leave-one-out by time (`LS: valid_and_test`, order `TO`) then holds out
  exactly the same events (checked: the same test users).
- Ours: configs/default.py (synthetic) and configs/movielens_100k.py as they
  are, at each seed. RecBole: SASRec (CE loss, `--max_len` items of
  history), early stopping on its validation NDCG@10 (patience
  `--stopping_step`, at most `--epochs`), the best epoch's weights.
- Both scored on the test events by full ranking over every item with the
  user's rated items excluded (RecBole's own sequential metric does not
  exclude them), Recall@10 and NDCG@10 per user; per seed the mean over
  the same users, and over `--seeds` the mean +- standard error of each
  and of the difference (ours - RecBole, user-paired within a seed).
- CPU seconds of each side's process (ours: training and evaluation in
  this process; RecBole: its child process as it measures itself at its
  end, imports and data preparation included).
- A RecBole run is reused, not trained again, when its scores and sidecar
  (`<runs_dir>/<data>/recbole_<seed>.npz` and `.npz.json`) exist and the
  sidecar's settings (model, seed, epochs, patience, history length, batch
  and the exported events' SHA-256: what decides its scores; not
  `--threads` or the RecBole install) equal this run's. After changing
  the runner or RecBole, pass `--noreuse_recbole` to train every seed
  afresh. The artifact records per seed which were reused and their CPU
  seconds as their sidecars recorded them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import numpy as np

from benchmarks import harness, plots
from benchmarks.userllm import next_item as next_item_benchmark
from data import sequences, sources, splits
from data import timelines as tl
from infra import mesh as mesh_lib, ranking, results
from infra.errors import ConfigError

FLAGS = (
    harness.Flag("datasets", ["movielens", "synthetic"], "Data sets (movielens, "
                 "synthetic)."),
    harness.Flag("seeds", ["0", "1", "2"], "Seeds of both sides."),
    harness.Flag("recbole_python", ".venv-recbole/bin/python", "The Python of "
                 "RecBole's environment (requirements-recbole.txt)."),
    harness.Flag("epochs", 200, "RecBole's epoch limit."),
    harness.Flag("stopping_step", 10, "RecBole's early-stopping patience (epochs "
                 "without a better validation NDCG@10)."),
    harness.Flag("max_len", 50, "RecBole SASRec's history length."),
    harness.Flag("batch_size", 256, "RecBole's training batch."),
    harness.Flag("threads", 1, "torch threads of RecBole's process."),
    harness.Flag("movielens_dir", "../shared/data/movielens-100k",
                 "The MovieLens-100K folder."),
    harness.Flag("runs_dir", "", "Runs go under here (default runs/<out's name>)."),
    harness.Flag("tiny", False, "The :tiny configs (a smoke run)."),
    harness.Flag("reuse_recbole", True, "Reuse a finished RecBole run whose "
                 "recorded settings equal this run's (see the protocol)."),
)
METRICS = ("recall@10", "ndcg@10")
RUNNER = os.path.join(os.path.dirname(__file__), "recbole_runner.py")


def write_inter(timelines: tl.UserTimelines, path: str) -> None:
  """RecBole's atomic .inter file: user token = user index + 1, item token =
  our item id, timestamp = the event's index (every user's events in
  order, so RecBole's time order is ours)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  users = np.repeat(np.arange(timelines.num_users), np.diff(timelines.user_offsets))
  with open(path, "w") as f:
    f.write("user_id:token\titem_id:token\ttimestamp:float\n")
    for index, (user, item) in enumerate(zip(users, timelines.item_ids)):
      f.write(f"{user + 1}\t{item}\t{index}\n")


def check_split(timelines: tl.UserTimelines) -> None:
  """Every user with a held-out pair: RecBole's leave-one-out splits users
  with fewer than 3 events otherwise than ours."""
  short = np.diff(timelines.user_offsets) < 3
  if short.any():
    raise ConfigError(f"{int(short.sum())} users have fewer than 3 events; the "
                      "side-by-side split needs 3 or more for every user")


def per_user_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
  hit = ranks < 10
  return {"recall@10": hit.astype(np.float64),
          "ndcg@10": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)}


def recbole_settings(args, inter_path: str, seed: int) -> dict:
  """What decides a RecBole run's scores: a reused run must match all of it
  (the keys recbole_runner.run_settings records in its sidecar)."""
  with open(inter_path, "rb") as f:
    events = hashlib.sha256(f.read()).hexdigest()
  return {"model": "SASRec", "seed": seed, "epochs": args.epochs,
          "stopping_step": args.stopping_step, "max_len": args.max_len,
          "batch_size": args.batch_size, "inter_sha256": events}


def finished_run(out: str, settings: dict) -> dict | None:
  """The sidecar of a finished run at `out` made with `settings`, else None
  (no run, an unreadable sidecar, or one of other settings: said in a line)."""
  try:
    with open(out + ".json") as f:
      sidecar = json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError:
    print(f"[recbole] {out}.json is not JSON: not a finished run")
    return None
  if not isinstance(sidecar, dict) or sidecar.get("settings") != settings:
    print(f"[recbole] {out} was made with other settings")
    return None
  return sidecar if os.path.exists(out) else None


def train_recbole(args, data_dir: str, name: str, seed: int, out: str) -> None:
  """RecBole's run in its own process (its sidecar records its CPU seconds)."""
  command = [args.recbole_python, RUNNER, "--data_dir", data_dir, "--dataset", name,
             "--seed", str(seed), "--epochs", str(args.epochs),
             "--stopping_step", str(args.stopping_step), "--max_len",
             str(args.max_len), "--batch_size", str(args.batch_size),
             "--threads", str(args.threads), "--out", out]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"RecBole's run failed: {done.stderr[-2000:]}")


def recbole_side(args, timelines, test: splits.HeldOut, data_dir: str, name: str,
                 seed: int, out: str) -> dict:
  """RecBole's SASRec (trained here, or a finished run reused); our metric
  on its scores."""
  settings = recbole_settings(args, os.path.join(data_dir, name, f"{name}.inter"),
                              seed)
  sidecar = finished_run(out, settings) if args.reuse_recbole else None
  reused = sidecar is not None
  if reused:
    print(f"[recbole] reusing {out} (same settings)")
  else:
    train_recbole(args, data_dir, name, seed, out)
    sidecar = finished_run(out, settings)
    if sidecar is None:
      raise RuntimeError(f"RecBole's run left no sidecar with this run's "
                         f"settings beside {out}")
  saved = np.load(out)
  row_of_user = {int(u) - 1: i for i, u in enumerate(saved["users"])}
  if set(row_of_user) != set(test.users.tolist()):
    raise RuntimeError("RecBole's test users are not ours: the splits differ")
  vocab = timelines.num_items + 1
  scores = np.full((len(test.users), vocab), -np.inf, np.float32)
  known = saved["items"] > 0
  rows = np.asarray([row_of_user[int(u)] for u in test.users])
  scores[:, saved["items"][known]] = saved["scores"][rows][:, known]
  excluded = sequences.excluded_items(sequences.seen_items(timelines, test),
                                      len(test.users), vocab)
  ranks = np.asarray(ranking.target_ranks(scores, test.targets, excluded))
  return {"per_user": per_user_metrics(ranks),
          "cpu_seconds": float(sidecar["cpu_seconds"]), "reused": reused,
          "valid_ndcg": saved["valid_ndcg"].tolist(),
          "best_epoch": int(saved["best_epoch"]),
          "train_seconds": float(saved["train_seconds"])}


def our_side(config, workdir: str) -> dict:
  """The next_item workflow at `config`; its test means and CPU seconds."""
  from userllm import next_item_workflow
  began = time.process_time()
  metrics = next_item_workflow.run(config, workdir, mesh_lib.make_mesh(config.mesh))
  return {"means": {m: metrics[f"test/model/next_item/{m}"] for m in METRICS},
          "cpu_seconds": time.process_time() - began,
          "steps": int(metrics["steps"])}


def over_seeds(values: list[float]) -> dict:
  mean, stderr = harness.mean_and_stderr(np.asarray(values))
  return {"mean": mean, "stderr": stderr, "per_seed": values}


def measure(run: harness.Run) -> dict:
  args = run.args
  if not os.path.exists(args.recbole_python):
    raise ConfigError(f"--recbole_python={args.recbole_python!r} does not exist: "
                      "python -m venv .venv-recbole && .venv-recbole/bin/pip "
                      "install -r requirements-recbole.txt")
  if len(args.seeds) < 2:
    raise ConfigError(f"--seeds={','.join(args.seeds)}: the standard errors over "
                      "seeds need 2 or more")
  root = args.runs_dir or os.path.join("runs", os.path.basename(run.out))
  rows = {}
  for dataset in args.datasets:
    config = next_item_benchmark.config_of(dataset, args)
    timelines = sources.load_timelines(config.data)
    check_split(timelines)
    test = splits.leave_last_out(timelines).test
    data_dir = os.path.join(root, dataset, "recbole_data")
    write_inter(timelines, os.path.join(data_dir, dataset, f"{dataset}.inter"))
    ours, theirs = [], []
    for seed in (int(s) for s in args.seeds):
      seeded = config.copy_and_resolve_references()
      seeded.seed = seed
      ours.append(our_side(seeded, os.path.join(root, dataset, f"ours_{seed}")))
      theirs.append(recbole_side(args, timelines, test, data_dir, dataset, seed,
                                 os.path.join(root, dataset, f"recbole_{seed}.npz")))
    their_means = [{m: float(t["per_user"][m].mean()) for m in METRICS}
                   for t in theirs]
    rows[dataset] = {
        "test_users": len(test.users),
        "ours": {m: over_seeds([o["means"][m] for o in ours]) for m in METRICS},
        "recbole_sasrec": {m: over_seeds([t[m] for t in their_means])
                           for m in METRICS},
        "difference": {m: over_seeds([o["means"][m] - t[m]
                                      for o, t in zip(ours, their_means)])
                       for m in METRICS},
        "ours_cpu_seconds": float(np.mean([o["cpu_seconds"] for o in ours])),
        "recbole_cpu_seconds": float(np.mean([t["cpu_seconds"] for t in theirs])),
        "recbole_best_epochs": [t["best_epoch"] for t in theirs],
        "recbole_cpu_seconds_per_seed": [t["cpu_seconds"] for t in theirs],
        "recbole_reused": [t["reused"] for t in theirs],
        "recbole_valid_ndcg": [t["valid_ndcg"] for t in theirs],
        "our_steps": ours[0]["steps"]}
  return {"rows": rows, "seeds": list(args.seeds),
          "recbole": {"model": "SASRec", "loss": "CE",
                                    "max_len": args.max_len,
                                    "batch_size": args.batch_size,
                                    "stopping_step": args.stopping_step,
                                    "epochs": args.epochs}}


def stopped_early(row: dict, epoch_limit: int) -> str:
  """'yes' per seed whose validation curve stopped before the epoch limit
  (RecBole's patience ran out: converged); 'no' where the limit cut it."""
  return ", ".join("yes" if len(curve) < epoch_limit else "no"
                   for curve in row["recbole_valid_ndcg"])


def present(payload: dict):
  def cell(s):
    return f"{s['mean']:.4f} ± {s['stderr']:.4f}"
  r = payload["recbole"]
  lines = [f"Test users' last events, full ranking over every item (the user's "
           f"rated items excluded), the same events for both sides; ± one "
           f"standard error over seeds. RecBole: {r['model']} ({r['loss']} loss, "
           f"{r['max_len']} items of history, batch {r['batch_size']}, early "
           f"stopping after {r['stopping_step']} epochs without a better "
           "validation NDCG@10).", ""]
  cells = []
  for name, row in payload["rows"].items():
    for metric in METRICS:
      cells.append([name, metric, cell(row["ours"][metric]),
                    cell(row["recbole_sasrec"][metric]),
                    f"{row['difference'][metric]['mean']:+.4f} ± "
                    f"{row['difference'][metric]['stderr']:.4f}",
                    f"{row['ours_cpu_seconds']:.0f}",
                    f"{row['recbole_cpu_seconds']:.0f}",
                    str([e + 1 for e in row["recbole_best_epochs"]]),
                    stopped_early(row, r["epochs"])])
  lines += results.markdown_table(
      ["data", "metric", "ours", "RecBole SASRec", "ours - RecBole",
       "our CPU s", "RecBole CPU s", "RecBole's best epoch per seed",
       "early-stopped (converged)"], cells)
  for name, row in payload["rows"].items():
    flags = row.get("recbole_reused", [])
    # payloads before "seeds" was recorded ran seeds 0, 1, ...
    seeds = payload.get("seeds") or [str(i) for i in range(len(flags))]
    reused = [seed for seed, r in zip(seeds, flags) if r]
    if reused:
      lines += ["", f"{name}: RecBole's runs at seeds {', '.join(reused)} were "
                "reused: finished earlier with the same settings (their CPU "
                "seconds as their sidecars recorded them: "
                f"{', '.join(f'{c:.0f}' for c in row['recbole_cpu_seconds_per_seed'])})."]
  fig, (bars, curves) = plots.panels(2)
  names = list(payload["rows"])
  for i, side in enumerate(("ours", "recbole_sasrec")):
    bars.bar([j + 0.4 * i for j in range(len(names))],
             [payload["rows"][n][side]["recall@10"]["mean"] for n in names], 0.4,
             yerr=[payload["rows"][n][side]["recall@10"]["stderr"] for n in names],
             label=side)
  bars.set_xticks([j + 0.2 for j in range(len(names))], names)
  bars.set(ylabel="test Recall@10", title="same events, history excluded")
  bars.legend(loc="lower right")
  for k, name in enumerate(names):
    row = payload["rows"][name]
    # CPU seconds per epoch: the mean run's, spread evenly over its epochs
    epochs = np.mean([len(c) for c in row["recbole_valid_ndcg"]])
    per_epoch = row["recbole_cpu_seconds"] / epochs
    color = f"C{k}"
    runs = row["recbole_valid_ndcg"]
    seeds = payload.get("seeds") or [str(i) for i in range(len(runs))]
    for i, (seed, curve) in enumerate(zip(seeds, runs)):
      curves.plot(per_epoch * np.arange(1, len(curve) + 1), curve, color=color,
                  alpha=1.0 / (1 + i), label=f"{name}, RecBole seed {seed}")
    curves.axvline(row["ours_cpu_seconds"], color=color, linestyle=":",
                   label=f"{name}: our whole run")
  curves.set(xlabel="CPU seconds (RecBole: its mean per epoch x epochs)",
             ylabel="RecBole's validation NDCG@10",
             title="RecBole's validation curve against CPU time")
  curves.legend(fontsize=7)
  return lines, fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
