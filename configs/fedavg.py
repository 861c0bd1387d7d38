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

from configs import common


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = common.experiment("federated")
  config.data = common.data(tiny, max_len=16 if tiny else 50)
  config.model = common.sequence_model(tiny, dropout=0.0)
  config.federated = common.federated(tiny)
  # The loop's cadence; num_steps counts rounds.
  config.train = (
      common.schedule(num_steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                      eval_batch_size=32) if tiny else
      common.schedule(num_steps=300, log_every=25, eval_every=100,
                      checkpoint_every=50, eval_batch_size=256))
  return config
