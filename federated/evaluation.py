"""Participation-gap evaluation (Yuan et al. 2022, "What Do We Mean by
Generalization in Federated Learning?").

Three evaluations of the same model, each scored per client and then summarised
over clients (mean and percentiles):

- in_sample: participating clients, events they trained on;
- out_of_sample: participating clients, their held-out later events;
- non_participating: clients that never trained, the same later events.

out_of_sample_gap = in_sample - out_of_sample (the classic generalisation gap);
participation_gap = out_of_sample - non_participating (what the paper adds: the
cost of deploying to clients that never took part).

The task (federated/tasks.py) scores every held-out event (for next-item
prediction: full-ranking Recall@10 and NDCG@10, seen items excluded); a
client's score is the mean over its events (with synthesised clients, over all
its users' events). Keys follow `<split>/<scorer>/<task>/<metric>`, the metric
carrying its statistic: `out_of_sample/model/next_item/recall@10_p90`.
"""

from __future__ import annotations

import numpy as np

from federated.clients import ParticipationSplit
from infra import results

SPLITS = ("in_sample", "out_of_sample", "non_participating")
PERCENTILES = (10, 25, 50, 75, 90)


def per_client_means(values: np.ndarray, row_clients: np.ndarray) -> np.ndarray:
  """Mean of `values` ([rows]) per client, over the clients that have rows."""
  clients, inverse = np.unique(row_clients, return_inverse=True)
  sums = np.bincount(inverse, weights=values, minlength=len(clients))
  return sums / np.bincount(inverse, minlength=len(clients))


def summarize(per_client: np.ndarray) -> dict[str, float]:
  """{mean, its standard error over clients, p10, p25, p50, p75, p90}."""
  out = {"mean": float(per_client.mean()), "stderr": _stderr(per_client)}
  for q, value in zip(PERCENTILES, np.percentile(per_client, PERCENTILES)):
    out[f"p{q}"] = float(value)
  return out


class ParticipationGapEvaluator:
  """`evaluate(params)`: the task's metrics on the splits of a
  ParticipationSplit, per client then summarised, for the model and the
  task's baselines, plus the two gaps (on the means).

  `splits` limits the splits scored (periodic evaluation: out_of_sample);
  `summary` the statistics reported (periodic: the mean only). Splits without
  events (e.g. no non-participating clients) are left out.
  """

  def __init__(self, task, timelines, split: ParticipationSplit, batch_size: int,
               mesh, baselines: dict[str, np.ndarray] | None = None,
               splits=SPLITS, full_summary: bool = True):
    self.task, self.client_of_user = task, split.client_of_user
    self.baselines, self.full_summary = baselines or {}, full_summary
    held_out = {"in_sample": split.in_sample, "out_of_sample": split.out_of_sample,
                "non_participating": split.non_participating}
    self.row_clients = {name: split.client_of_user[held_out[name].users]
                        for name in splits if len(held_out[name])}
    self.scorers = {name: task.row_scorer(timelines, held_out[name], batch_size, mesh)
                    for name in self.row_clients}

  def _summaries(self, name: str, scorer_name: str, rows: dict) -> tuple[dict, dict]:
    """(result entries, {metric: {client id: its mean}}) of one split and
    scorer."""
    out, by_client = {}, {}
    clients = np.unique(self.row_clients[name])
    for metric, values in rows.items():
      per_client = per_client_means(values, self.row_clients[name])
      stats = summarize(per_client) if self.full_summary else {
          "mean": float(per_client.mean())}
      out.update(results.prefixed({f"{metric}_{s}": v for s, v in stats.items()},
                                  name, scorer_name, self.task.name))
      by_client[metric] = dict(zip(clients.tolist(), per_client.tolist()))
    return out, by_client

  def _model_rows(self, name: str, params, client_params) -> dict:
    """{metric: [rows]} of the model on split `name`: the one model, or with
    `client_params` each client's own model on its rows (clients it has no
    model for, e.g. non-participating ones, get `params`)."""
    scorer = self.scorers[name]
    if client_params is None:
      return self.task.row_metrics(scorer, params)
    row_clients = self.row_clients[name]
    rows = None
    for client in np.unique(row_clients):
      subset = np.nonzero(row_clients == client)[0]
      own = client_params(int(client))
      values = self.task.row_metrics(scorer, params if own is None else own, subset)
      if rows is None:
        rows = {k: np.zeros(len(row_clients)) for k in values}
      for k, v in values.items():
        rows[k][subset] = v
    return rows

  def client_scores(self, name: str, params, client_params=None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(client ids, {metric: [clients] per-client mean}) of the model on
    split `name` (for paired comparisons of two trainings, client by client)."""
    rows = self._model_rows(name, params, client_params)
    clients = np.unique(self.row_clients[name])
    return clients, {m: per_client_means(v, self.row_clients[name])
                     for m, v in rows.items()}

  def evaluate(self, params, client_params=None) -> dict[str, float]:
    """The summaries and gaps; `client_params(client_id)` -> that client's own
    parameters or None (personalised training: federated/personalisation.py)."""
    out = {}
    for scorer_name in ("model", *self.baselines):
      means = {}
      for name, scorer in self.scorers.items():
        rows = (self._model_rows(name, params, client_params)
                if scorer_name == "model"
                else self.task.baseline_row_metrics(scorer,
                                                    self.baselines[scorer_name]))
        entries, means[name] = self._summaries(name, scorer_name, rows)
        out.update(entries)
        if self.full_summary and scorer_name == "model":
          count = len(self.row_clients[name])
          out[results.key(name, "model", self.task.name, "events")] = float(count)
          out[results.key(name, "model", self.task.name, "clients")] = float(
              len(np.unique(self.row_clients[name])))
      out.update(self._gaps(means, scorer_name))
    return out

  def _gaps(self, means: dict, scorer_name: str) -> dict[str, float]:
    """The gaps of the means over clients, each with its standard error: the
    out-of-sample gap paired over the participating clients it compares on
    themselves, the participation gap over two disjoint sets of clients."""
    out = {}
    for gap, (a, b) in (("out_of_sample_gap", ("in_sample", "out_of_sample")),
                        ("participation_gap", ("out_of_sample",
                                               "non_participating"))):
      if a in means and b in means:
        for metric in means[a]:
          first = np.array(list(means[a][metric].values()))
          second = np.array(list(means[b][metric].values()))
          key = results.key(gap, scorer_name, self.task.name, metric)
          out[key] = float(first.mean() - second.mean())
          if gap == "out_of_sample_gap":
            both = sorted(set(means[a][metric]) & set(means[b][metric]))
            out[key + "_stderr"] = _stderr(np.array(
                [means[a][metric][c] - means[b][metric][c] for c in both]))
          else:
            out[key + "_stderr"] = float(np.hypot(_stderr(first), _stderr(second)))
    return out


def _stderr(values: np.ndarray) -> float:
  """The standard error of the mean of `values` (0 for fewer than 2)."""
  return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
