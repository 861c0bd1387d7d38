"""The optimiser every centralised stage trains with (federated rounds build
their own client and server optimisers in `federated/algorithms.py`)."""

from __future__ import annotations

import ml_collections
import optax


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay, global-norm clipping.

  Reads `train.{learning_rate, warmup_steps, num_steps, weight_decay, grad_clip}`.
  """
  # a warm-up as long as the run (a short test run) still leaves a decay step
  warmup = min(train.warmup_steps, max(train.num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, train.learning_rate, warmup, max(train.num_steps, warmup + 1))
  return optax.chain(optax.clip_by_global_norm(train.grad_clip),
                     optax.adamw(schedule, weight_decay=train.weight_decay))
