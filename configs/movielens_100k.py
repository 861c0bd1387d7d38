"""Next-item transformer on real MovieLens-100K files.

Run: python main.py --config configs/movielens_100k.py \\
       --config.data.dir=../shared/data/movielens-100k --workdir runs/ml100k
Scale: 943 users, 1,682 items, 100,000 ratings; the default's model with history
length 100 (median user has 65 ratings); ~3 minutes on 2 CPU cores.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = "movielens"
  config.data.dir = "../shared/data/movielens-100k"
  config.data.max_len = 100
  config.model.dropout = 0.2
  config.train.batch_size = 64
  config.train.num_steps = 600
  config.train.learning_rate = 2e-3
  config.train.eval_every = 200
  return config
