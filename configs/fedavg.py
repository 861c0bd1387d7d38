"""Federated next-item training (FedAvg family) with participation-gap evaluation.

Run on the embedded synthetic data:
  python main.py --config configs/fedavg.py --workdir runs/fedavg
On MovieLens-100K with one client per user:
  python main.py --config configs/fedavg.py --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k --workdir runs/fedavg_ml100k
Other algorithms: --config.federated.algorithm=fedsgd|fedavg|fedavgm|fedprox|fedyogi
(fedprox also needs --config.federated.prox_mu=0.01, say). Synthesised clients:
--config.federated.partition=dirichlet|semantic --config.federated.num_clients=100.
`configs/fedavg.py:tiny`: 64 users, 8 clients a round, 6 rounds (the tests').
"""

import ml_collections

from configs import common


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = common.experiment("federated")
  config.data = common.data(tiny, max_len=16 if tiny else 50)
  config.model = common.sequence_model(tiny, dropout=0.0)
  config.federated = ml_collections.ConfigDict(dict(
      task="next_item",  # the task model of federated/tasks.py
      algorithm="fedadam",  # fedsgd | fedavg | fedavgm | fedprox | fedadam | fedyogi
      clients_per_round=8 if tiny else 64,
      # Clients: "natural" = one per user; "dirichlet" / "semantic" synthesise
      # num_clients clients from users (label = favourite genre).
      partition="natural",
      num_clients=0,
      dirichlet_alpha=0.5,
      embedding_dim=16,  # semantic partition: item2vec (PPMI-SVD) width
      # Participation gap: share of clients that train; per user, share of the
      # last events held out.
      participating_fraction=0.8,
      heldout_fraction=0.2,
      max_examples_per_client=0,  # 0 = no cap on windows per client
      # Clients trained this many at a time (lax.map over vmapped chunks, so
      # a chunk's activations stay in cache on CPU); 0 = the whole cohort in
      # one vmap. The round's result is the same.
      client_chunk=0,
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
  ))
  # The loop's cadence; num_steps counts rounds.
  config.train = (
      common.schedule(num_steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                      eval_batch_size=32) if tiny else
      common.schedule(num_steps=300, log_every=25, eval_every=100,
                      checkpoint_every=50, eval_batch_size=256))
  return config
