"""RecBole's side of benchmarks/userllm/recbole_peer.py, run in its own venv
(requirements-recbole.txt: torch and RecBole 1.2.1, kept out of the main
install). It imports nothing of this project.

  .venv-recbole/bin/python benchmarks/userllm/recbole_runner.py \\
    --data_dir D --dataset NAME --model SASRec --seed 0 --out scores.npz

Reads `D/NAME/NAME.inter` (user_id, item_id, timestamp), splits it with
RecBole's leave-one-out by time (`LS: valid_and_test`, order `TO`: each
user's last event is the test event, the one before it validation, which is
recbole_peer.py's split when the timestamp is the event's index), trains
with RecBole's trainer and early stopping on its validation NDCG@10 (the
epoch choice only: RecBole's sequential metric does not mask history), and
writes every test user's scores over every item with the best epoch's
weights:

  users [n] int (the user tokens), items [m] int (column j's item token; -1
  for RecBole's padding item), scores [n, m] float32, valid_ndcg [epochs],
  best_epoch (0-based index into valid_ndcg), train_seconds.

and beside it `<out>.json`: the settings it ran with and the CPU seconds of
this whole process (data preparation included), written last, so its
presence means the scores are complete (recbole_peer.py reuses a run whose
settings match instead of training again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's reload

import numpy as np  # noqa: E402
import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import get_model, init_seed  # noqa: E402


def parse() -> argparse.Namespace:
  p = argparse.ArgumentParser()
  p.add_argument("--data_dir", required=True)
  p.add_argument("--dataset", required=True)
  p.add_argument("--model", default="SASRec")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs", type=int, default=200)
  p.add_argument("--stopping_step", type=int, default=10)
  p.add_argument("--max_len", type=int, default=50)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--out", required=True)
  return p.parse_args()


def run_settings(args) -> dict:
  """What decides this run's scores: its flags and the events' SHA-256 (the
  keys recbole_peer.recbole_settings compares before reusing a run)."""
  path = os.path.join(args.data_dir, args.dataset, f"{args.dataset}.inter")
  with open(path, "rb") as f:
    events = hashlib.sha256(f.read()).hexdigest()
  return {"model": args.model, "seed": args.seed, "epochs": args.epochs,
          "stopping_step": args.stopping_step, "max_len": args.max_len,
          "batch_size": args.batch_size, "inter_sha256": events}


def cpu_seconds() -> float:
  """CPU seconds of this process and any it waited for, imports included."""
  return sum(u.ru_utime + u.ru_stime for u in (
      resource.getrusage(resource.RUSAGE_SELF),
      resource.getrusage(resource.RUSAGE_CHILDREN)))


def config_of(args) -> Config:
  return Config(model=args.model, dataset=args.dataset, config_dict={
      "data_path": args.data_dir, "USER_ID_FIELD": "user_id",
      "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
      "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
      "loss_type": "CE", "train_neg_sample_args": None,
      "epochs": args.epochs, "stopping_step": args.stopping_step,
      "MAX_ITEM_LIST_LENGTH": args.max_len, "train_batch_size": args.batch_size,
      "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                    "mode": "full", "group_by": "user"},
      "metrics": ["NDCG"], "topk": [10], "valid_metric": "NDCG@10",
      "eval_batch_size": 4096, "device": "cpu", "use_gpu": False,
      "show_progress": False, "seed": args.seed, "reproducibility": True,
      "checkpoint_dir": os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                     f"saved_{args.model}_{args.seed}"),
      "state": "WARNING"})


def test_scores(model, test_data, dataset) -> tuple[np.ndarray, np.ndarray]:
  """(user tokens [n], scores [n, items]) of every test user."""
  users, scores = [], []
  model.eval()
  with torch.no_grad():
    for interaction, _, _, _ in test_data:
      batch = model.full_sort_predict(interaction).view(len(interaction), -1)
      users.append(interaction[dataset.uid_field].numpy())
      scores.append(batch.numpy().astype(np.float32))
  internal = np.concatenate(users)
  tokens = np.asarray(dataset.id2token(dataset.uid_field, internal), np.int64)
  return tokens, np.concatenate(scores)


def main() -> None:
  args = parse()
  args.data_dir, args.out = os.path.abspath(args.data_dir), os.path.abspath(args.out)
  # RecBole writes its logs (log/, log_tensorboard/) into the working
  # directory: the output's, never the caller's
  os.chdir(os.path.dirname(args.out))
  settings = run_settings(args)
  if os.path.exists(args.out + ".json"):  # an earlier run's: stale from now on
    os.remove(args.out + ".json")
  torch.set_num_threads(args.threads)
  config = config_of(args)
  init_seed(config["seed"], config["reproducibility"])
  dataset = create_dataset(config)
  train_data, valid_data, test_data = data_preparation(config, dataset)
  model = get_model(config["model"])(config, train_data.dataset).to("cpu")
  trainer = Trainer(config, model)
  curve = []
  original = trainer._valid_epoch

  def recorded(*a, **k):  # every validation NDCG@10, for the artifact's curve
    score, result = original(*a, **k)
    curve.append(float(score))
    return score, result

  trainer._valid_epoch = recorded
  began = time.time()
  trainer.fit(train_data, valid_data, saved=True, show_progress=False)
  seconds = time.time() - began
  state = torch.load(trainer.saved_model_file, map_location="cpu")
  model.load_state_dict(state["state_dict"])
  users, scores = test_scores(model, test_data, dataset)
  items = np.asarray([-1] + [int(t) for t in dataset.field2id_token[
      dataset.iid_field][1:]], np.int64)
  if not np.isfinite(scores[:, 1:]).all():
    raise SystemExit("error: RecBole's scores are not finite")
  partial = args.out + ".partial.npz"  # never a half-written file at `out`
  np.savez(partial, users=users, items=items, scores=scores,
           valid_ndcg=np.asarray(curve), best_epoch=int(np.argmax(curve)),
           train_seconds=seconds)
  os.replace(partial, args.out)
  sidecar = {"settings": settings, "cpu_seconds": cpu_seconds(),
             "torch_threads": args.threads}
  with open(args.out + ".json.partial", "w") as f:
    json.dump(sidecar, f, indent=1)
  os.replace(args.out + ".json.partial", args.out + ".json")


if __name__ == "__main__":
  main()
