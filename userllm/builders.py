"""From a `user_llm` config to the pieces of the model library: the tokenizer,
the LLM / adapter / encoder configs (errors name the config field), the
UserLLM, its sharded train state under a strategy, and the stage names of a
workdir. Used by the User-LLM workflow and its benchmarks.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import linen as nn

from data import prompts
from data.vocab import Tokenizer
from infra import optim, train_loop
from infra.errors import ConfigError
from userllm import language_model
from userllm.models import adapters, llm as llm_lib
from userllm import user_llm as ul
from userllm.models import sequence_model as sm



@dataclasses.dataclass(frozen=True)
class Method:
  """A way to put the user into the LLM: how the model reads the user
  (`integration`: user_llm.INTEGRATIONS) and what the prompt builder gives it
  (`history`: prompts.HISTORIES)."""
  integration: str
  history: str


# config.userllm.method -> Method: the one place a new method is named
METHODS = {
    "cross_attention": Method("cross_attention", "events"),  # User-LLM
    "soft_prompt": Method("soft_prompt", "events"),  # User-LLM
    # the soft prompt before the history's titles: User-LLM and the text prompt
    "soft_prompt_text": Method("soft_prompt", "text_events"),
    "text_prompt": Method("text", "text"),  # the history's titles in the prompt
    "no_history": Method("text", "none"),  # the bare task prompt
}
INPUT_PIPELINES = ("arrays", "seqio")  # userllm/workflow.py: task_batches


def tasks_of(config, field: str) -> tuple[str, ...]:
  """`config.userllm.<field>` as a tuple of known task names."""
  value = config.userllm[field]
  tasks = tuple(t.strip() for t in value.split(",")) if isinstance(value, str) else (
      tuple(value))
  unknown = [t for t in tasks if t not in prompts.TASKS]
  if not tasks or unknown:
    raise ConfigError(f"config.userllm.{field}={value!r}: {unknown or 'empty'}; "
                      f"tasks are {prompts.TASKS}")
  return tasks


def check(config) -> None:
  """Config errors that would otherwise surface after hours of training."""
  u = config.userllm
  if u.method not in METHODS:
    raise ConfigError(f"config.userllm.method={u.method!r} is not one of "
                      f"{tuple(METHODS)}")
  if u.history_len < 1:
    raise ConfigError(f"config.userllm.history_len={u.history_len} must be >= 1")
  if u.input_pipeline not in INPUT_PIPELINES:
    raise ConfigError(f"config.userllm.input_pipeline={u.input_pipeline!r} is not "
                      f"one of {INPUT_PIPELINES}")
  if u.strategy == "adapters" and config.adapter.kind == "none":
    raise ConfigError("config.userllm.strategy='adapters' trains the adapters: "
                      "set config.adapter.kind (lora | molora | mode | molora_sd)")
  for field in ("lm_train", "encoder_train", "train"):  # every stage's schedule
    train_loop.check_schedule(config[field], f"config.{field}")


def tokenizer_for(config, workdir: str, timelines) -> Tokenizer:
  """`config.llm.tokenizer` (Gemma's), or one trained on the task text of
  `timelines` (language_model.tokenizer)."""
  return language_model.tokenizer(config, workdir,
                                  lambda: prompts.corpus(timelines))


def adapter_config(config, llm: llm_lib.LLMConfig) -> adapters.AdapterConfig:
  """config.adapter; with `match_params_of` naming another kind, the rank that
  brings this kind's trainable count closest to that kind's at the configured
  rank and experts (MoDE and MoLoRA match exactly when rank = num_experts)."""
  fields = dict(config.adapter)
  match = fields.pop("match_params_of")
  targets = fields["targets"]
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  fields.update(targets=tuple(targets), num_tasks=len(prompts.TASKS))
  try:
    cfg = adapters.AdapterConfig(**fields).validate()
    if match and cfg.enabled and match != cfg.kind:
      reference = dataclasses.replace(cfg, kind=match).validate()
      cfg = adapters.match_budget(cfg, llm, adapters.formula_count(reference, llm))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("adapter.")
                      else f"config.adapter: {e}") from None
  return cfg


def llm_config(config, vocab_size: int, method: str,
               base: llm_lib.LLMConfig | None = None,
               with_adapters: bool = True) -> llm_lib.LLMConfig:
  """config.llm (shape from `base`, a loaded Gemma's config, when given) with
  cross-attention for `method` and the adapters of config.adapter."""
  cross = dict(cross_attention_every=(
      config.llm.cross_attention_every
      if METHODS[method].integration == "cross_attention" else 0),
               cross_attention_gate_init=config.userllm.gate_init)
  cfg = language_model.llm_config(config, vocab_size, **cross)
  if base is not None:
    cfg = dataclasses.replace(base, dtype=cfg.dtype, remat=cfg.remat, **cross)
  if not with_adapters:
    return cfg
  return dataclasses.replace(cfg, adapter=adapter_config(config, cfg))


def encoder_config(config, num_items: int, num_genres: int
                   ) -> sm.SequenceModelConfig:
  """The fused user encoder of config.encoder over `history_len + 1` events."""
  try:
    return sm.SequenceModelConfig.from_config(
        config.encoder, num_items + 1, config.userllm.history_len + 1,
        num_genres=num_genres).validate()
  except ValueError as e:
    raise ConfigError(f"config.encoder: {e}") from None


def build_model(config, timelines, vocab_size: int, method: str,
                base: llm_lib.LLMConfig | None = None,
                with_adapters: bool = True) -> ul.UserLLM:
  """The UserLLM for `method`; `base` (a loaded Gemma's config) fixes the LLM's
  shape, the config adds cross-attention, adapters and dtype."""
  cfg = llm_config(config, vocab_size, method, base, with_adapters)
  u = config.userllm
  return ul.UserLLM(ul.UserLLMConfig(
      encoder=encoder_config(config, timelines.num_items,
                             len(timelines.items.genre_names)),
      llm=cfg, integration=METHODS[method].integration, num_latents=u.num_latents,
      perceiver_layers=u.perceiver_layers, perceiver_heads=u.perceiver_heads,
      aux_items=timelines.num_items + 1 if u.aux_item_weight else 0,
      normalise_user_tokens=u.normalise_user_tokens, item_text=u.item_text))


def init_state(model: ul.UserLLM, strategy: str, train, seed: int, mesh,
               builder: prompts.PromptBuilder, new_scale: float = 1.0):
  """(state, shardings, tx, trainable mask) of a UserLLM, parameters fresh;
  `train` is the stage's optimiser section; `new_scale` multiplies the
  learning rate of the parts made fresh for the task (ul.NEW_PARTS)."""
  dummy = builder.batch(prompts.Examples(np.zeros(1, np.int32), np.ones(1, np.int32),
                                         np.zeros(1, np.int32)), np.arange(1))
  init = lambda rng: model.init(rng, dummy.get("events"), dummy["tokens"],  # noqa: E731
                                dummy["token_mask"])["params"]
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init(jax.random.PRNGKey(0))))
  try:
    mask = ul.trainable_mask(shapes, strategy)
  except ValueError as e:
    raise ConfigError(f"config.userllm.strategy: {e}") from None
  if new_scale <= 0:
    raise ConfigError(f"config.userllm.new_params_lr_scale={new_scale} must be > 0")
  tx = ul.masked_optimizer(optim.make_optimizer(train), mask, new_scale)
  state, shardings = train_loop.create_state(init, tx, jax.random.PRNGKey(seed),
                                             mesh)
  return state, shardings, tx, mask


def stage_name(config, model: ul.UserLLM) -> str:
  """`<method>_h<H>`, the text prompt's context (`_ctx256`), and the adapter
  (`_mode_r4_e4`) when there is one."""
  u, adapter = config.userllm, model.config.llm.adapter
  name = f"{u.method}_h{u.history_len}"
  shows_text = prompts.HISTORIES[METHODS[u.method].history][0]
  name += f"_ctx{u.text_prompt_len}" if shows_text else ""
  if adapter.enabled:
    name += f"_{adapter.kind}_r{adapter.rank}"
    name += f"_e{adapter.num_experts}" if adapter.kind != "lora" else ""
    name += f"_{adapter.router}" if adapter.router != "token" else ""
    name += f"_top{adapter.top_k}" if adapter.top_k else ""
  return name
