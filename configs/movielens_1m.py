"""Next-item transformer on MovieLens-1M, the SASRec literature's setting.

Get the data (once; prints GroupLens' terms, checks the published MD5):
  python -m data.download movielens-1m --dir ../shared/data --accept_terms
  (unpacks to ../shared/data/ml-1m, this config's default folder)
Run: python main.py --config configs/movielens_1m.py --workdir runs/ml1m
Scale: 6,040 users, 3,706 rated movies, 1,000,209 ratings (every user has 20
or more); history length 200 and dropout 0.2 as SASRec's ML-1M runs
(Kang & McAuley 2018); 3,000 steps of batch 128. Not yet run on this machine
(no ML-1M copy here): take the schedule as a starting point and select it
on validation.
`configs/movielens_1m.py:tiny` reads tests/data/datasets/ml-1m, 14 users
written in the 1M format for the tests (invented titles, not GroupLens' data;
batch 8: 14 training windows).
"""

from configs import common

TINY_DIR = "tests/data/datasets/ml-1m"


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = common.experiment("next_item")
  config.data = common.data(tiny, source="movielens",
                            directory=TINY_DIR if tiny else "../shared/data/ml-1m",
                            max_len=16 if tiny else 200)
  config.model = common.sequence_model(tiny, dropout=0.0 if tiny else 0.2)
  config.train = common.train(
      common.schedule(num_steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                      eval_batch_size=32) if tiny else
      common.schedule(num_steps=3000, log_every=100, eval_every=500,
                      checkpoint_every=500, eval_batch_size=256),
      common.optimizer(batch_size=8 if tiny else 128, learning_rate=1e-3,
                       warmup_steps=2 if tiny else 200))
  return config
