"""One place that checks the numeric values of every workflow's config before
any work starts, by field name (a field means the same in every config):
one-line ConfigErrors naming the field. Every number must be finite; the
table below says what else each must be. Checks that need more than one
field or the data (a batch that must divide the mesh, a schedule) stay with
their code and are one-line errors too.
"""

from __future__ import annotations

import math

from infra.errors import ConfigError

AT_LEAST_ONE = frozenset({
    "batch_size", "eval_batch_size", "client_batch_size", "num_steps",
    "log_every", "checkpoint_every", "keep_checkpoints", "max_len",
    "history_len", "lm_history", "text_prompt_len", "embed_dim",
    "embedding_dim", "mlp_dim", "head_dim", "num_heads", "num_kv_heads",
    "num_layers", "perceiver_heads", "perceiver_layers",
    "num_experts", "clients_per_round", "local_epochs", "candidate_chunk",
    "cuts_per_user", "vocab_size", "rope_max_wavelength",
    "cross_attention_every", "num_users", "num_items", "num_genres",
    "min_events", "max_events"})
AT_LEAST_ZERO = frozenset({
    "seed", "eval_every", "stop_after_steps", "warmup_steps", "eval_users",
    "answer_len", "num_latents", "max_examples_per_client", "num_clients", "top_k",
    "num_related", "rank", "learning_rate", "client_learning_rate",
    "server_learning_rate", "weight_decay", "grad_clip", "prox_mu",
    "mean_extra_events", "taste_strength", "popularity_exponent"})
POSITIVE = frozenset({"alpha", "dirichlet_alpha", "taste_concentration"})
# [low, high): a probability of dropping, a momentum
HALF_OPEN_UNIT = frozenset({"dropout", "dropout_rate", "client_momentum",
                            "server_momentum"})
OPEN_UNIT = frozenset({"heldout_fraction"})  # (0, 1)
UNIT = frozenset({"follow_prob"})  # [0, 1]
FRACTION_UP_TO_ONE = frozenset({"participating_fraction"})  # (0, 1]


def _problem(name: str, value) -> str | None:
  """Why `value` cannot be field `name`, or None."""
  if not math.isfinite(value):
    return "must be finite"
  rules = (
      (AT_LEAST_ONE, value >= 1, "must be >= 1"),
      (AT_LEAST_ZERO, value >= 0, "must be >= 0"),
      (POSITIVE, value > 0, "must be > 0"),
      (HALF_OPEN_UNIT, 0 <= value < 1, "must be in [0, 1)"),
      (OPEN_UNIT, 0 < value < 1, "must be in (0, 1)"),
      (UNIT, 0 <= value <= 1, "must be in [0, 1]"),
      (FRACTION_UP_TO_ONE, 0 < value <= 1, "must be in (0, 1]"))
  for names, ok, why in rules:
    if name in names and not ok:
      return why
  return None


def check_config(config, prefix: str = "config") -> None:
  """Raises a ConfigError naming the first numeric field out of its range."""
  for name, value in config.items():
    field = f"{prefix}.{name}"
    if hasattr(value, "items"):
      check_config(value, field)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      problem = _problem(name, value)
      if problem:
        raise ConfigError(f"{field}={value!r} {problem}")
