"""Default experiment: next-item transformer on the embedded synthetic data.

Scale: 2,000 synthetic users, 1,000 items, ~118k events; a 2-layer, 64-wide
transformer (~0.2M parameters); 600 steps of batch 128. The same config runs
unchanged on a GPU or a TPU slice (results and timings: docs/next_item.md).
`configs/default.py:tiny`: 64 users, one layer, 6 steps (the tests' variant).
"""

from configs import common


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = common.experiment("next_item")
  config.data = common.data(tiny, max_len=16 if tiny else 50)  # items of history read
  config.model = common.sequence_model(tiny)
  config.train = common.train(
      common.schedule(num_steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                      eval_batch_size=32) if tiny else
      common.schedule(num_steps=600, log_every=100, eval_every=300,
                      checkpoint_every=200, eval_batch_size=256),
      common.optimizer(batch_size=16 if tiny else 128, learning_rate=3e-3,
                       warmup_steps=2 if tiny else 100))
  return config
