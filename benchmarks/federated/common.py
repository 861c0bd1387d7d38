"""What the federated benchmarks share: the overrides that train centrally,
and per-client scores split into validation and test users."""

from __future__ import annotations

import numpy as np

from benchmarks import harness


def centralised(epochs: int) -> dict:
  """Overrides that make the federated workflow train centrally: every
  example pooled into one client, one client a round, the server copying it
  (FedAvg at rate 1), Adam at 3e-3 inside the client; a round is an epoch."""
  return {"federated.pooling": "central", "federated.clients_per_round": 1,
          "federated.max_examples_per_client": 0, "federated.algorithm": "fedavg",
          "federated.server_learning_rate": 1.0, "federated.client_optimizer": "adam",
          "federated.client_learning_rate": 3e-3, "train.num_steps": epochs}


def client_scores(f, state, config, mesh, metric: str = "recall@10"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(client ids [n], `metric` per client [n]) of `state`'s model on the
  participating clients' held-out events (the out_of_sample split)."""
  from federated import evaluation
  scorer = evaluation.ParticipationGapEvaluator(
      f.task, f.timelines, f.split, config.train.eval_batch_size, mesh,
      splits=("out_of_sample",))
  clients, scores = scorer.client_scores("out_of_sample", state.params)
  if not np.all(np.isfinite(scores[metric])):
    raise FloatingPointError(f"a client's {metric} is not finite")
  return clients, scores[metric]


def valid_and_test(clients, per_client, seed: int) -> dict:
  """The validation users' mean (what a choice reads) and the test users'
  mean ± standard error (what a table reports) of a per-client score."""
  valid, test = harness.user_halves(clients, seed)
  mean, stderr = harness.mean_and_stderr(per_client[test])
  return {"valid": float(per_client[valid].mean()), "test": mean, "test_se": stderr,
          "valid_users": int(valid.sum()), "test_users": int(test.sum())}
