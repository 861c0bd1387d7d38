"""Client datasets: who the clients are, what each holds, which ones a round samples.

- `participation_split`: clients split into participating and non-participating,
  and every user's timeline into training events and held-out last events
  ("What Do We Mean by Generalization in Federated Learning?", Yuan et al. 2022).
- `pack_clients`: each client's examples as one zero-padded block, so a cohort is
  a fixed-shape array `[clients, max_examples, ...]` (fedjax's padding trick).
- `CohortSampler`: the clients of round r, a pure function of (seed, r), so a
  resumed run samples exactly the cohorts an uninterrupted run would.
- `build_clients`: all of the above for a config and a task.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import splits
from data import timelines as tl
from federated import partition
from infra.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ParticipationSplit:
  """Attributes:
    client_of_user: [num_users] int32 client id of every user.
    participating: [num_clients] bool, True for clients that train.
    train: timelines holding only the training events (participating clients'
      users keep their first events; non-participating users keep none).
    in_sample: the last training events of participating users, as held-out
      positions (they were trained on): the in-sample metric.
    out_of_sample: the held-out last events of participating users.
    non_participating: the same last events of non-participating users, predicted
      from the events before them (which were never trained on).
  """
  client_of_user: np.ndarray
  participating: np.ndarray
  train: tl.UserTimelines
  in_sample: splits.HeldOut
  out_of_sample: splits.HeldOut
  non_participating: splits.HeldOut


def _positions(users: np.ndarray, starts: np.ndarray, stops: np.ndarray,
               timelines: tl.UserTimelines) -> splits.HeldOut:
  """HeldOut rows for events [starts[i], stops[i]) of each users[i]."""
  counts = np.maximum(stops - starts, 0)
  rows_user = np.repeat(users, counts)
  within_user = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts,
                                                    counts)
  history = np.repeat(starts, counts).astype(np.int64) + within_user
  offsets = timelines.user_offsets[rows_user]
  return splits.HeldOut(users=rows_user.astype(np.int32),
                        history_lengths=history.astype(np.int32),
                        targets=timelines.item_ids[offsets + history])


def participation_split(timelines: tl.UserTimelines, client_of_user: np.ndarray,
                        participating_fraction: float, heldout_fraction: float,
                        seed: int, eval_clients: int = 0) -> ParticipationSplit:
  """Splits clients and, within every user, events in time.

  Each user with n >= 3 events holds out its last k = max(1, round(heldout_fraction
  * n)) events (keeping at least 2 before them); the in-sample positions are the
  k training events just before those (at least one event of history each).
  Users with fewer than 3 events keep all events for training and are not
  evaluated. With `eval_clients` > 0 only that many participating and that
  many non-participating clients (drawn uniformly from the seed) are
  evaluated: large populations, whose every held-out event would take longer
  to score than training; every mean is then over a sample of clients, and
  its standard error says so. Training is unchanged.
  """
  if not 0.0 < participating_fraction <= 1.0:
    raise ConfigError("config.federated.participating_fraction must be in (0, 1], "
                      f"got {participating_fraction}")
  if not 0.0 < heldout_fraction < 1.0:
    raise ConfigError("config.federated.heldout_fraction must be in (0, 1), got "
                      f"{heldout_fraction}")
  num_clients = int(client_of_user.max()) + 1
  rng = np.random.default_rng([seed, 1])
  num_participating = max(1, int(round(participating_fraction * num_clients)))
  participating = np.zeros(num_clients, bool)
  participating[rng.permutation(num_clients)[:num_participating]] = True

  lengths = timelines.lengths
  evaluated = lengths >= 3
  heldout = np.where(evaluated, np.clip(np.round(heldout_fraction * lengths),
                                        1, lengths - 2), 0).astype(np.int64)
  train_len = lengths - heldout
  user_participates = participating[client_of_user]
  users = np.arange(timelines.num_users)
  part = users[evaluated & user_participates]
  nonpart = users[evaluated & ~user_participates]
  if eval_clients < 0:
    raise ConfigError(f"config.federated.eval_clients={eval_clients} must be >= 0 "
                      "(0: every client)")
  if eval_clients:
    part, nonpart = (_users_of_sampled_clients(group, client_of_user, eval_clients,
                                               np.random.default_rng([seed, 5, i]))
                     for i, group in enumerate((part, nonpart)))

  position = np.arange(timelines.num_events) - np.repeat(
      timelines.user_offsets[:-1], lengths)
  keep = (position < np.repeat(train_len, lengths)) & np.repeat(
      user_participates, lengths)
  return ParticipationSplit(
      client_of_user=client_of_user.astype(np.int32), participating=participating,
      train=timelines.select_events(keep),
      in_sample=_positions(part, np.maximum(train_len[part] - heldout[part], 1),
                           train_len[part], timelines),
      out_of_sample=_positions(part, train_len[part], lengths[part], timelines),
      non_participating=_positions(nonpart, train_len[nonpart], lengths[nonpart],
                                   timelines))


def _users_of_sampled_clients(users: np.ndarray, client_of_user: np.ndarray,
                              max_clients: int, rng: np.random.Generator
                              ) -> np.ndarray:
  """The `users` of at most `max_clients` of their clients, the clients
  drawn uniformly without replacement (all of them when there are fewer)."""
  clients = np.unique(client_of_user[users])
  if len(clients) <= max_clients:
    return users
  kept = rng.choice(clients, max_clients, replace=False)
  return users[np.isin(client_of_user[users], kept)]


@dataclasses.dataclass(frozen=True)
class ClientDataset:
  """Attributes:
    examples: [num_clients, max_examples, ...] zero-padded examples per client.
    num_examples: [num_clients] int32 real rows per client.
    client_ids: [num_clients] int32 global client id of each row.
    num_capped: examples left out because a client held more than the cap.
    server_examples: [n, ...] examples the server holds instead of any client
      (mixed FL's datacenter data; empty without one).
  """
  examples: np.ndarray
  num_examples: np.ndarray
  client_ids: np.ndarray
  num_capped: int = 0
  server_examples: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.client_ids)


def pack_clients(examples: np.ndarray, example_clients: np.ndarray,
                 client_ids: np.ndarray, max_examples: int = 0) -> ClientDataset:
  """Groups examples by client into zero-padded blocks.

  Args:
    examples: [n, ...] examples.
    example_clients: [n] client id of each example.
    client_ids: the clients to pack, in order (clients without examples get an
      empty block).
    max_examples: cap on examples per client (0 = no cap). A client above the cap
      keeps its last `max_examples` examples (for timelines: the most recent); the
      number left out is reported in `num_capped`.
  """
  client_ids = np.asarray(client_ids, np.int32)
  chosen = np.isin(example_clients, client_ids)
  order = np.argsort(example_clients[chosen], kind="stable")
  grouped = examples[chosen][order]
  grouped_clients = example_clients[chosen][order]
  by_id = np.argsort(client_ids, kind="stable")
  row_of_example = by_id[np.searchsorted(client_ids, grouped_clients, sorter=by_id)]
  counts = np.bincount(row_of_example, minlength=len(client_ids)).astype(np.int32)
  width = int(counts.max()) if len(counts) else 0
  if max_examples:
    width = min(width, max_examples)
  width = max(width, 1)
  # Each example's place in its client's block: the last `width` of a client's
  # examples are kept, in their order (no loop over clients).
  first_of_client = np.searchsorted(grouped_clients, grouped_clients, side="left")
  count_of_example = counts[row_of_example]
  slot = (np.arange(len(grouped)) - first_of_client
          - (count_of_example - np.minimum(count_of_example, width)))
  kept = slot >= 0
  packed = np.zeros((len(client_ids), width) + examples.shape[1:], examples.dtype)
  packed[row_of_example[kept], slot[kept]] = grouped[kept]
  kept_counts = np.minimum(counts, width).astype(np.int32)
  return ClientDataset(packed, kept_counts, client_ids,
                       num_capped=int(counts.sum() - kept_counts.sum()))


class CohortSampler:
  """`sampler(r)`: the cohort of round r, `cohort_size` distinct clients drawn
  uniformly from `dataset` by a generator seeded with (seed, r).

  Returns a dict of numpy arrays {examples, num_examples, client_ids,
  client_rows}, leading axis = cohort_size (the layout `algorithms.make_round`
  takes; client_rows index the per-client state table).
  """

  def __init__(self, dataset: ClientDataset, cohort_size: int, seed: int):
    if not 1 <= cohort_size <= len(dataset):
      raise ConfigError(f"config.federated.clients_per_round={cohort_size} must be "
                        f"between 1 and the {len(dataset)} training clients")
    self.dataset, self.cohort_size, self.seed = dataset, cohort_size, seed

  def __call__(self, round_index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, 2, round_index])
    rows = np.sort(rng.choice(len(self.dataset), self.cohort_size, replace=False))
    return {"examples": self.dataset.examples[rows],
            "num_examples": self.dataset.num_examples[rows],
            "client_ids": self.dataset.client_ids[rows],
            "client_rows": rows.astype(np.int32)}


POOLINGS = ("none", "iid", "central")


def pool_examples(pooling: str, example_clients: np.ndarray,
                  client_ids: np.ndarray, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(each example's client, the clients to pack) under `pooling`:
  "none" keeps every example with its owner; "iid" deals the examples to the
  same clients at random, each keeping its count (the IID control: the same
  federated round with no per-user skew); "central" gives every example to
  one client, the first of `client_ids` (centralised training through the
  same round, one client a round)."""
  if pooling == "none":
    return example_clients, client_ids
  if pooling == "iid":
    return np.random.default_rng([seed, 3]).permutation(example_clients), client_ids
  if pooling == "central":
    return np.full_like(example_clients, client_ids[0]), client_ids[:1]
  raise ConfigError(f"config.federated.pooling={pooling!r} is not one of {POOLINGS}")


def build_clients(fed, timelines: tl.UserTimelines, client_examples, seed: int
                  ) -> tuple[ParticipationSplit, ClientDataset]:
  """The participation split of `fed.partition`'s clients and the packed
  training examples of the participating ones (pooled by `fed.pooling`).
  With `fed.datacenter.users` the examples of one group of users go to the
  server instead (`server_examples`); `fed.datacenter.swap` gives the clients
  that group and the server the other (the centralised-only baseline).

  client_examples: train timelines -> (examples [n, ...], owning users [n]).
  """
  split = participation_split(
      timelines, partition.client_of_user(fed, timelines, seed),
      fed.participating_fraction, fed.heldout_fraction, seed, fed.eval_clients)
  examples, example_users = client_examples(split.train)
  server_examples = examples[:0]
  datacenter = fed.get("datacenter")
  at_server = partition.datacenter_users(datacenter.users if datacenter else "none",
                                         timelines)
  if at_server is not None:
    if datacenter.swap:
      at_server = ~at_server
    on_server = at_server[example_users]
    server_examples = examples[on_server]
    examples, example_users = examples[~on_server], example_users[~on_server]
  client_ids = np.nonzero(split.participating)[0]
  if at_server is not None:  # clients whose users all went to the server: gone
    client_ids = np.intersect1d(client_ids, split.client_of_user[example_users])
  example_clients, client_ids = pool_examples(
      fed.get("pooling", "none"), split.client_of_user[example_users],
      client_ids, seed)
  dataset = pack_clients(examples, example_clients, client_ids,
                         fed.max_examples_per_client)
  return split, dataclasses.replace(dataset, server_examples=server_examples)
