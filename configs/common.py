"""Sections that several experiment configs share, built fresh on every call
(configs compose these; none inherits by mutating and deleting another's
fields). Each builder returns exactly the fields its workflow reads.

Variants are picked by the `arg` of `get_config(arg)`, given on the command
line after a colon: `--config configs/default.py:tiny` is the seconds-long
variant the tests run.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("", "tiny")


def is_tiny(arg: str | None) -> bool:
  """True for the `tiny` variant; any other unknown variant is an error."""
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; variants are "
                     f"{[v for v in VARIANTS if v]} (e.g. configs/default.py:tiny)")
  return arg == "tiny"


def synthetic(tiny: bool, **overrides) -> ml_collections.ConfigDict:
  """The embedded synthetic generator's spec (data/synthetic.py)."""
  spec = dict(num_users=2000, num_items=1000, num_genres=18, min_events=20,
              mean_extra_events=40.0, max_events=300, taste_concentration=0.3,
              taste_strength=3.0, popularity_exponent=0.5, follow_prob=0.35,
              num_related=5,
              communities=0,  # > 0: a related-items map per community (i mod C)
              seed=0)
  if tiny:
    spec.update(num_users=64, num_items=120, min_events=8, mean_extra_events=8.0,
                max_events=40)
  spec.update(overrides)
  return ml_collections.ConfigDict(spec)


def data(tiny: bool, source: str = "synthetic", directory: str = "",
         **fields) -> ml_collections.ConfigDict:
  """`config.data`: where the timelines come from (+ workflow-specific fields).
  `synthetic` is there only when the source is synthetic."""
  section = ml_collections.ConfigDict(dict(source=source, dir=directory, **fields))
  if source == "synthetic":
    section.synthetic = synthetic(tiny)
  else:  # a (user, item) rated twice: "error" names the line, "drop" keeps the first
    section.duplicates = "error"
  return section


def sequence_model(tiny: bool, **overrides) -> ml_collections.ConfigDict:
  """An item-sequence transformer (userllm/models/sequence_model.py)."""
  fields = (dict(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64, dropout=0.0)
            if tiny else dict(embed_dim=64, num_layers=2, num_heads=2, mlp_dim=256,
                              dropout=0.1))
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def schedule(num_steps: int, log_every: int, eval_every: int,
             checkpoint_every: int, eval_batch_size: int, keep_checkpoints: int = 2,
             ) -> ml_collections.ConfigDict:
  """What `infra.train_loop.fit` reads, plus the evaluation batch size."""
  return ml_collections.ConfigDict(dict(
      num_steps=num_steps, log_every=log_every, eval_every=eval_every,
      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
      eval_batch_size=eval_batch_size,
      stop_after_steps=0,  # > 0: stop there as if preempted; a rerun resumes
      # a step with a non-finite loss or update: "error" stops the run,
      # "skip" keeps the state as it was and counts the step
      nonfinite="error"))


def optimizer(batch_size: int, learning_rate: float, warmup_steps: int,
              weight_decay: float = 0.01, grad_clip: float = 1.0
              ) -> ml_collections.ConfigDict:
  """What `infra.optim.make_optimizer` reads, plus the batch size."""
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
      weight_decay=weight_decay, grad_clip=grad_clip))


def train(schedule_section, optimizer_section) -> ml_collections.ConfigDict:
  """A centralised stage's `train` section: its schedule and its optimiser."""
  return ml_collections.ConfigDict({**schedule_section.to_dict(),
                                    **optimizer_section.to_dict()})


def mesh() -> ml_collections.ConfigDict:
  """`data = -1` takes every device left over after `model`; `fsdp` also
  shards the parameters' `embed` axis over `data` (infra/mesh.py)."""
  return ml_collections.ConfigDict(dict(data=-1, model=1, fsdp=False))


# config.workflow -> the workflow module (imported by main.py and benchmarks only)
WORKFLOWS = {
    "next_item": "userllm.next_item_workflow",
    "user_llm": "userllm.workflow",
    "federated": "federated.workflow",
    "federated_llm": "federated.llm_workflow",
    "rlpf": "summarize.workflow",
}


def experiment(workflow: str) -> ml_collections.ConfigDict:
  """The top-level fields every experiment has."""
  config = ml_collections.ConfigDict()
  config.workflow = workflow
  config.seed = 0
  config.distributed = False  # True on multi-host TPU/GPU: jax.distributed.initialize()
  config.mesh = mesh()
  return config


def federated(tiny: bool, **overrides) -> ml_collections.ConfigDict:
  """`config.federated`: the FedAvg-family round, its clients and its
  aggregation stages (federated/algorithms.py reads it)."""
  fed = ml_collections.ConfigDict(dict(
      task="next_item",  # the task model of federated/tasks.py
      algorithm="fedadam",  # fedsgd | fedavg | fedavgm | fedprox | fedadam | fedyogi
      clients_per_round=8 if tiny else 64,
      # Clients: "natural" = one per user; "dirichlet" / "semantic" synthesise
      # num_clients clients from users (label = favourite genre); "modulo":
      # user i in client i mod num_clients (one community each on synthetic
      # data with data.synthetic.communities = num_clients)
      partition="natural",
      num_clients=0,
      dirichlet_alpha=0.5,
      embedding_dim=16,  # semantic partition: item2vec (PPMI-SVD) width
      # Participation gap: share of clients that train; per user, share of the
      # last events held out.
      participating_fraction=0.8,
      heldout_fraction=0.2,
      # Clients evaluated per split (participating / non-participating),
      # drawn once from the seed; 0 = every client. For large populations:
      # the means and their standard errors are then over the sample.
      eval_clients=0,
      max_examples_per_client=0,  # 0 = no cap on windows per client
      # Clients trained this many at a time per data shard (lax.map over
      # vmapped chunks, so a chunk's activations stay in cache on CPU); 0 = the
      # whole cohort in one vmap; -1 = auto (on CPU 8 shared over the data
      # shards, else 0; see federated/workflow.resolve_client_chunk). The
      # round's result is the same.
      client_chunk=-1,
      # Local training.
      local_epochs=1,
      client_batch_size=2 if tiny else 4,
      client_optimizer="sgd",  # sgd | adam (state fresh each round)
      client_learning_rate=0.5,
      client_momentum=0.0,
      prox_mu=0.0,  # FedProx proximal weight
      # Aggregation and server.
      aggregator="mean",  # federated/aggregators.py: mean | dp
      # each client's update as sent (federated/compression.py): none | qsgd |
      # truncated_uniform | tnqsgd (bits per coordinate) | topk (fraction
      # kept); the quantisers' scale estimated per "tensor" or per "row"
      compression=ml_collections.ConfigDict(dict(scheme="none", bits=4,
                                                 fraction=0.01, scale="tensor")),
      # "fellrec": a model per client, mixed from the cohort's by similarity
      # with curriculum heating (federated/personalisation.py); include_self
      # lets a client's own update into its attention
      personalisation="none",
      fellrec=ml_collections.ConfigDict(dict(alpha=0.7, beta=1.0,
                                             temperature=0.05,
                                             include_self=False)),
      weighting="examples",  # examples | uniform
      dropout_rate=0.0,  # chance a sampled client drops out of a round
      server_learning_rate=0.0,  # 0 = the algorithm's default (algorithms.py):
                                 # 1.0 for fedsgd/fedavg/fedprox/fedavgm, 1e-2
                                 # for fedadam/fedyogi
      server_momentum=0.9,  # fedavgm
      # Mixed FL (federated/algorithms.py): a server-side loss f_c that the
      # task offers (retrieval: "global_spreadout", weight x the spreadout
      # of the item table), joined by parallel | one_way | two_way, with the
      # server's own SGD steps on f_c.
      mixed=ml_collections.ConfigDict(dict(
          server_loss="none", weight=0.0, algorithm="parallel", central_steps=1,
          central_learning_rate=1.0)),
      # Mixed FL's datacenter data: "genre" gives the server the users whose
      # favourite genre has an odd popularity rank (the clients keep the
      # rest); swap exchanges the two groups; the server loss "datacenter"
      # reads server_batch_size of the server's examples a round.
      datacenter=ml_collections.ConfigDict(dict(users="none", swap=False,
                                                server_batch_size=64)),
      # "central": every participating client's examples pooled into one
      # client (centralised training through the same round); "iid": the
      # examples dealt back to the clients at random, same counts (the IID
      # control); "none": each client keeps its own.
      pooling="none",
  ))
  fed.update(overrides)
  return fed
