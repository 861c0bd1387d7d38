"""Default experiment: next-item transformer on the embedded synthetic data.

Scale: 2,000 synthetic users, 1,000 items, ~118k events; a 2-layer, 64-wide
transformer (~0.2M parameters); 600 steps of batch 128 (validation recall plateaus by ~500). About 2.5 minutes on 2 CPU
cores; the same config runs unchanged on a GPU or a TPU slice.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workflow = "next_item"
  config.seed = 0
  config.distributed = False  # True on multi-host TPU/GPU: jax.distributed.initialize()

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # or "movielens" with data.dir
  config.data.dir = ""
  config.data.max_len = 50  # items of history the model reads
  # Text-to-text (seqio) tasks: vocabulary file, or trained locally when empty.
  config.data.vocab_path = ""
  config.data.vocab_size = 2000  # upper bound; small corpora get fewer pieces
  config.data.text_history = 20  # titles of history in a text prompt
  config.data.text_ratings = False  # seqio text prompts: "(rating)" after titles
  config.data.synthetic = ml_collections.ConfigDict(dict(
      num_users=2000, num_items=1000, num_genres=18, min_events=20,
      mean_extra_events=40.0, max_events=300, taste_concentration=0.3,
      taste_strength=3.0, popularity_exponent=0.5, follow_prob=0.35,
      num_related=5, seed=0))

  config.model = ml_collections.ConfigDict(dict(
      embed_dim=64, num_layers=2, num_heads=2, mlp_dim=256, dropout=0.1))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=128, num_steps=600, learning_rate=3e-3, warmup_steps=100,
      weight_decay=0.01, grad_clip=1.0, log_every=100, eval_every=300,
      eval_batch_size=256, checkpoint_every=200, keep_checkpoints=2,
      stop_after_steps=0))  # > 0: stop there as if preempted; rerun resumes

  config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  return config
