"""Next-item transformer on Amazon Reviews 2023, category All_Beauty.

Get the data (once; prints the terms; reviews + item metadata, gzip):
  python -m data.download amazon2023:All_Beauty --dir ../shared/data/amazon2023 \\
    --accept_terms
Run: python main.py --config configs/amazon_beauty.py --workdir runs/beauty
The release's All_Beauty has 701.5K reviews by 632.0K users of 112.6K
products (the site's statistics): most users have one or two reviews, so
they train but get no held-out target (the `[data]` line counts them). The
lab's 5-core benchmark of the same reviews is
`--config.data.events=5core/last_out_w_his` after a download with
`--benchmark 5core/last_out_w_his`. The release repeats some reviews (same
user and product): `duplicates="drop"` keeps the earliest, as the lab's
benchmark does. Categories: the 20 most frequent of `main_category` and the
`categories` lists (data/amazon.py). Histories are short: max_len 50.
Not yet run on this machine (no internet here).
`configs/amazon_beauty.py:tiny` reads tests/data/datasets/amazon2023 (24
users written in the release's format for the tests).
"""

from configs import common

TINY_DIR = "tests/data/datasets/amazon2023"


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = common.experiment("next_item")
  config.data = common.data(
      tiny, source="amazon2023",
      directory=TINY_DIR if tiny else "../shared/data/amazon2023",
      max_len=16 if tiny else 50, category="All_Beauty", events="reviews",
      num_categories=20)
  config.data.duplicates = "drop"
  config.model = common.sequence_model(tiny, dropout=0.0 if tiny else 0.2)
  config.train = common.train(
      common.schedule(num_steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                      eval_batch_size=32) if tiny else
      common.schedule(num_steps=2000, log_every=100, eval_every=500,
                      checkpoint_every=500, eval_batch_size=256),
      common.optimizer(batch_size=16 if tiny else 128, learning_rate=1e-3,
                       warmup_steps=2 if tiny else 100))
  return config
