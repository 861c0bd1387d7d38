"""User-LLM on the embedded synthetic data: LM pretraining on the task text, user
encoder pretraining, then cross-attention User-LLM (see userllm/workflow.py).

Scale: a 2-layer, 128-wide Gemma-style LM trained from scratch (real runs load
Gemma: configs/user_llm_gemma_tpu.py), a 2-layer 64-wide early-fusion encoder
over the latest 50 events, a 16-latent Perceiver. Pick the method with
`--config.userllm.method=cross_attention|soft_prompt|text_prompt|soft_prompt_text|no_history`.
`configs/user_llm.py:tiny` is the seconds-long variant the tests run.
"""

import ml_collections

from configs import common

ALL_TASKS = ("next_title", "favourite_genre", "rating", "title_genre", "summary")


def stage(tiny: bool, batch_size: int, num_steps: int, learning_rate: float,
          warmup_steps: int, eval_every: int = 0) -> ml_collections.ConfigDict:
  """One training stage's schedule and optimiser (tiny: 4 steps of 16)."""
  if tiny:
    batch_size, num_steps, warmup_steps, eval_every = 16, 4, 1, 0
  return common.train(
      common.schedule(num_steps=num_steps, log_every=2 if tiny else 50,
                      eval_every=eval_every, checkpoint_every=4 if tiny else 200,
                      eval_batch_size=8 if tiny else 16),
      common.optimizer(batch_size, learning_rate, warmup_steps))


def build(tiny: bool, multitask: bool) -> ml_collections.ConfigDict:
  """The User-LLM config, or (multitask) the five-task adapter experiment of
  configs/multitask.py: a text prompt through a frozen LM and its adapters."""
  config = common.experiment("user_llm")
  # vocab_size: the SentencePiece vocabulary trained on the data when
  # llm.tokenizer is empty (an upper bound: small corpora get fewer pieces)
  config.data = common.data(tiny, vocab_size=300 if tiny else 2000,
                            vocab_model="unigram",  # or "bpe"
                            title_pieces=False)  # True: every title one piece
  config.llm = ml_collections.ConfigDict(dict(
      embed_dim=32 if tiny else 128, num_layers=2, num_heads=2 if tiny else 4,
      num_kv_heads=1, head_dim=16 if tiny else 32, mlp_dim=64 if tiny else 512,
      rope_max_wavelength=10_000,
      # gemma1 | gemma2 | gemma3: the family's constants for an LM trained
      # here (userllm/models/gemma_variants.py); a checkpoint's own family wins
      family="gemma1",
      # a released Gemma (gemma_2b, gemma2_9b, gemma3_4b, ...: gemma_variants.
      # VARIANTS): with a checkpoint, whose constants to use (default: the
      # variant of the checkpoint's shapes); without one, the LM's whole shape
      variant="",
      cross_attention_every=1,  # used by method=cross_attention only
      dtype="float32",
      remat=False,  # recompute layers in the backward pass (llm.LLMConfig.remat)
      checkpoint="",  # an official Gemma 1/2/3 Flax checkpoint dir: skip LM pretraining
      drop_vision=False,  # Gemma 3 4B+: load the text model without its vision tower
      tokenizer=""))  # its tokenizer.model (or any SentencePiece model)
  config.encoder = common.sequence_model(tiny)
  config.encoder.fusion = "early"  # or "late"
  config.userllm = ml_collections.ConfigDict(dict(
      method="text_prompt" if multitask else "cross_attention",
      # full | adapters (needs adapter.kind) | frozen_llm | projector
      strategy="adapters" if multitask else "full",
      tasks=ALL_TASKS if multitask else ("next_title", "favourite_genre"),
      lm_tasks=("next_title",) if multitask else ("next_title", "favourite_genre"),
      text_ratings=multitask,  # text prompts show "(rating)" after each title
      # stage-3 batches: "arrays" (in memory) or "seqio" (the tasks' seqio
      # Mixture over the tfds data: data/seqio_tasks.py; same examples)
      input_pipeline="arrays",
      eval_base=False,  # also score the test tasks before stage-3 training
      eval_valid=True,  # score the valid split after training (as well as test)
      # results' train_step_seconds: the median of this many timed steps
      # after training (0: not timed; the tiny runs skip its extra compile)
      step_time_repeats=0 if tiny else 10,
      history_len=8 if tiny else (10 if multitask else 50),  # events shown
      text_prompt_len=48 if tiny else 256,  # LLM context for text prompts
      lm_history=3 if tiny else 10,  # titles per prompt when pretraining the LM
      answer_len=0,  # 0: the longest title / genre + eos
      # Perceiver queries: the user tokens; 0: no Perceiver, every encoder
      # state is a user token (h of them)
      num_latents=4 if tiny else 16, perceiver_layers=1, perceiver_heads=2,
      # learning rate x this for the parts made fresh in stage 3 (Perceiver,
      # projector, cross-attention blocks and gates; user_llm.NEW_PARTS)
      new_params_lr_scale=1.0,
      # tanh of the cross-attention gates at init: 0 (Flamingo's) makes a
      # fresh block a no-op, and its weights learn only as the gate opens
      gate_init=0.0,
      # > 0: + this x the next item's cross-entropy from the mean user token
      # (a linear head), so that stage 3 cannot make the user tokens constant
      # (docs/user_llm.md: where the user signal is lost)
      aux_item_weight=0.1,
      # a LayerNorm on the user tokens (unit scale, like the LLM's states):
      # the fresh projector's tokens are otherwise far too small to read
      normalise_user_tokens=True,
      # + each event's title as the LLM's mean title-token embedding on its
      # encoder state (UserLLMConfig.item_text)
      item_text=False,
      cuts_per_user=2 if (tiny or multitask) else 4,  # examples per user and task
      eval_users=16 if tiny else (200 if multitask else 300),  # 0: all
      probe_examples=32 if tiny else 2000,  # training cuts of the user probes
      candidate_chunk=64 if tiny else 256))  # item titles scored per call
  # Adapters on the LLM's projections (userllm/models/adapters.py); trained alone by
  # userllm.strategy="adapters", or with the rest by "full".
  config.adapter = ml_collections.ConfigDict(dict(
      kind="mode" if multitask else "none",  # none | lora | molora | mode | molora_sd
      rank=2 if tiny else 4, alpha=16.0, num_experts=2 if tiny else 4, top_k=0,
      router="token",  # token | task | token_task
      targets=(("q", "k", "v", "out", "gate", "up", "down") if multitask
               else ("q", "k", "v", "out")),
      # a kind: take the rank that matches its parameter count
      match_params_of="molora" if multitask else ""))
  if multitask:
    config.lm_train = stage(tiny, 32, 600, 3e-3, 100)
    config.train = stage(tiny, 32, 600, 3e-3, 50)
  else:
    config.lm_train = stage(tiny, 64, 800, 3e-3, 100)
    config.train = stage(tiny, 64, 600, 1e-3, 50, eval_every=300)
  config.encoder_train = stage(tiny, 128, 300, 3e-3, 50)
  return config


def get_config(arg: str = ""):
  return build(common.is_tiny(arg), multitask=False)
