"""Federated retrieval with a dual encoder (userllm/models/dual_encoder.py): each
user a client, the federated workflow with `federated.task = "retrieval"`.

Run on the embedded synthetic data, or on MovieLens-100K:
  python main.py --config configs/retrieval.py --workdir runs/retrieval
  python main.py --config configs/retrieval.py --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k --workdir runs/retrieval_ml100k
The loss: --config.retrieval.loss=batch_softmax|global_softmax|hinge, plus
spreadouts, e.g. --config.retrieval.spreadout.table=0.1 (the global spreadout
over the whole item table). Centralised training
through the same round: --config.federated.pooling=central
--config.federated.clients_per_round=1; the IID control: pooling=iid.
The global spreadout at the server instead of on the clients (mixed FL):
--config.retrieval.spreadout.table=0 --config.federated.mixed.server_loss=
global_spreadout --config.federated.mixed.weight=<lambda>.
`configs/retrieval.py:tiny`: 64 users, 8 clients a round, 6 rounds.
"""

import ml_collections

from configs import common


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = common.experiment("federated")
  config.data = common.data(tiny)
  config.retrieval = ml_collections.ConfigDict(dict(
      embed_dim=16 if tiny else 32,
      context_len=10,  # the last items the context tower reads
      loss="batch_softmax",  # batch_softmax | global_softmax | hinge
      logit_scale=10.0,  # cosine x this inside the softmaxes
      # lambda x Frobenius norm of the off-diagonal similarities, per term
      spreadout=ml_collections.ConfigDict(dict(context=0.0, label=0.0, cross=0.0,
                                                table=0.0)),
  ))
  config.federated = common.federated(
      # FedAdam: FedAvg's server step of 1 moves the item rows far too slowly
      # (each row is in few clients' updates, averaged over the cohort)
      tiny, task="retrieval", algorithm="fedadam", server_learning_rate=0.03,
      client_batch_size=4 if tiny else 16,
      client_optimizer="sgd", client_learning_rate=0.5, max_examples_per_client=
      0 if tiny else 256)
  config.train = (
      common.schedule(num_steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                      eval_batch_size=32) if tiny else
      common.schedule(num_steps=300, log_every=25, eval_every=100,
                      checkpoint_every=50, eval_batch_size=256))
  return config
