"""Federated User-LLM (issue 41, item 3): the user encoder, the Perceiver,
the projector and the LLM's gated cross-attention blocks (User-LLM, arXiv
2402.13598; userllm/user_llm.py) trained by the clients, the decoder LLM
itself frozen and held once (`config.federated.task="user_llm"`).

The prediction is the next-title task of federated/llm_task.py, but the
history reaches the LLM as user tokens, not as text: the user encoder (an
item-sequence transformer over the latest `history_len` item ids,
`config.encoder`, fusion "id") reads the history, the Perceiver compresses
its states into `config.userllm.num_latents` tokens, the projector maps them
to the LLM's width, and the LLM reads them by cross-attention (or as a soft
prompt, `config.userllm.integration`). The text is the warm-up's own opening,

    "Watched:" -> "<t>"

so the frozen LLM already writes a title there (the first title of a
history, which it learnt in the warm-up), and the user tokens move it to the
user's next one. The ranking reads the logits at that position at every
catalogue title's piece, as the adapters' task does (NextTitleScorer).

Rows (`client_examples`): one int32 row per training window, [item ids of
the history (H, right-padded) | "Watched:" | answer piece]; the scorer's rows
are the same without the answer. The round's `params` are every part but the
LLM's own weights (`user_llm.part_of(path) != "llm"`: encoder, Perceiver,
projector, cross-attention blocks and gates, and adapters when
`config.adapter.kind` names some); `frozen` is {"llm": the warm-up's base}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from data import splits
from data import timelines as tl
from data.vocab import Tokenizer
from federated import llm_task
from infra import ranking
from infra.errors import ConfigError
from userllm import user_llm as ul
from userllm.models import adapters as adapters_lib, llm
from userllm.models import sequence_model as sm

INTEGRATIONS = ("cross_attention", "soft_prompt")


def encoder_config(config, num_items: int) -> sm.SequenceModelConfig:
  """config.encoder over `history_len` item ids; errors name the field."""
  if config.encoder.fusion != "id":
    raise ConfigError(f"config.encoder.fusion={config.encoder.fusion!r}: the "
                      "federated User-LLM's rows carry item ids only (use 'id')")
  try:
    return sm.SequenceModelConfig.from_config(
        config.encoder, num_items + 1, config.data.history_len).validate()
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.encoder: {e}") from None


def user_llm_config(config, num_items: int, base: llm.LLMConfig
                    ) -> ul.UserLLMConfig:
  """The UserLLM over `base` (the warm-up's LLM, adapters as configured) with
  config.userllm's integration; errors name the field."""
  u = config.userllm
  if u.integration not in INTEGRATIONS:
    raise ConfigError(f"config.userllm.integration={u.integration!r} is not one "
                      f"of {INTEGRATIONS}")
  for field in ("num_latents", "perceiver_layers", "perceiver_heads"):
    if u[field] < 1:
      raise ConfigError(f"config.userllm.{field}={u[field]} must be >= 1")
  cross = u.cross_attention_every if u.integration == "cross_attention" else 0
  if u.integration == "cross_attention" and cross < 1:
    raise ConfigError(f"config.userllm.cross_attention_every={cross} must be "
                      ">= 1 with integration='cross_attention'")
  try:
    lm = dataclasses.replace(base, cross_attention_every=cross,
                             cross_attention_gate_init=u.gate_init).validate()
  except ValueError as e:
    raise ConfigError(f"config.userllm: {e}") from None
  return ul.UserLLMConfig(
      encoder=encoder_config(config, num_items), llm=lm,
      integration=u.integration, num_latents=u.num_latents,
      perceiver_layers=u.perceiver_layers, perceiver_heads=u.perceiver_heads,
      normalise_user_tokens=u.normalise_user_tokens,
      item_text=u.item_text).validate()


def trained_part(path: tuple[str, ...]) -> bool:
  """What the clients train: every part of a UserLLM but the LLM's own
  weights (user_llm.part_of)."""
  return ul.part_of(path) != "llm"


class UserLLMNextTitleTask(llm_task.NextTitleLLMTask):
  """`config.federated.task="user_llm"`: the next title from user tokens,
  the clients training the user path of a UserLLM over the frozen LLM."""

  name = "next_title"  # the same prediction: results keys line up

  def __init__(self, config, timelines: tl.UserTimelines, tokenizer: Tokenizer,
               model_config: llm.LLMConfig):
    super().__init__(config, timelines, tokenizer, model_config)  # text, base
    self.model = ul.UserLLM(user_llm_config(config, timelines.num_items,
                                            model_config))
    self.head = list(self.text.head)
    self.pieces = jnp.asarray(self.text.piece_of_item)
    self.example_loss = self._example_loss
    self.rank_fn = self._make_rank_fn()

  def _events(self, rows: jax.Array) -> tuple[dict, jax.Array]:
    """Rows [b, H + t] -> (the encoder's events: "items" [b, H] and, for
    item_text, each item's title piece as "titles" [b, H, 1] (0 for
    padding); the text tokens [b, t])."""
    items = rows[:, :self.history_len]
    return ({"items": items, "titles": self.pieces[items][..., None]},
            rows[:, self.history_len:])

  def _example_loss(self, params, examples: jax.Array, rng: jax.Array, frozen
                    ) -> jax.Array:
    """[b] the answer's cross-entropy after "Watched:", the user tokens
    read from the history's item ids (examples [b, H + len(head) + 1]).
    `config.task.history_lm_weight` plays no part: the titles of the
    history are not text here."""
    events, tokens = self._events(examples)
    logits = self.model.apply({"params": adapters_lib.merge_trees(params, frozen)},
                              events, tokens, tokens != 0, True,
                              rngs={"dropout": rng})
    return llm_task.nll_of_logits(logits, tokens)[:, -1]

  def _make_rank_fn(self):
    @jax.jit
    def rank_fn(params, rows, targets, excluded):
      events, tokens = self._events(rows)
      logits = self.model.apply({"params": params}, events, tokens, tokens != 0)
      return ranking.target_ranks(logits[:, -1][:, self.pieces], targets,
                                  excluded)

    return rank_fn

  def init_params(self, rng):
    rows = jnp.ones((1, self.history_len + len(self.head) + 1), jnp.int32)
    events, tokens = self._events(rows)
    return self.model.init(rng, events, tokens, tokens > 0)["params"]

  def split_params(self, params) -> tuple[dict, dict]:
    return adapters_lib.split_by_path(params, trained_part)

  def frozen_of_base(self, base) -> dict:
    return {"llm": base}

  def base_of_frozen(self, frozen) -> dict:
    return frozen["llm"]

  def prompts(self, histories: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[n, H + len("Watched:")] rows [history item ids | "Watched:"] of
    histories [n, H] (right-padded item ids; `lengths` unused: the encoder
    masks the padding)."""
    del lengths
    head = np.tile(np.asarray(self.head, np.int32), (len(histories), 1))
    return np.concatenate([histories.astype(np.int32), head], 1)

  def client_examples(self, train: tl.UserTimelines):
    """(rows [n, H + len("Watched:") + 1]: the prompt and the answer's
    piece, owners [n])."""
    windows, users = self.windows(train)
    histories, lengths, answers = llm_task.split_windows(windows)
    answer = self.text.piece_of_item[answers][:, None]
    return np.concatenate([self.prompts(histories, lengths), answer], 1), users

  def row_scorer(self, timelines: tl.UserTimelines, held_out: splits.HeldOut,
                 batch_size: int, mesh) -> llm_task.NextTitleScorer:
    return llm_task.NextTitleScorer(timelines, held_out, self.history_len,
                                    self.prompts, batch_size, mesh,
                                    self.rank_fn, self.whole_params)
