"""User-LLM on the embedded synthetic data: LM pretraining on the task text, user
encoder pretraining, then cross-attention User-LLM (see userllm/workflow.py).

Scale: a 2-layer, 128-wide Gemma-style LM trained from scratch (real runs load
Gemma: configs/user_llm_gemma_tpu.py), a 2-layer 64-wide early-fusion encoder
over the latest 50 events, a 16-latent Perceiver. Pick the method with
`--config.userllm.method=cross_attention|soft_prompt|text_prompt|no_history`.
"""

import ml_collections

from configs import default


def _train(batch_size, num_steps, learning_rate, warmup_steps, eval_every=0):
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size, num_steps=num_steps, learning_rate=learning_rate,
      warmup_steps=warmup_steps, weight_decay=0.01, grad_clip=1.0, log_every=50,
      eval_every=eval_every, eval_batch_size=16, checkpoint_every=200,
      keep_checkpoints=2, stop_after_steps=0))


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.workflow = "user_llm"
  del config.model  # the encoder is config.encoder, the LM config.llm

  config.llm = ml_collections.ConfigDict(dict(
      embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=32,
      mlp_dim=512, rope_max_wavelength=10_000,
      cross_attention_every=1,  # used by method=cross_attention only
      dtype="float32",
      checkpoint="",  # an official Gemma (v1) Flax checkpoint dir: skip LM pretraining
      tokenizer=""))  # its tokenizer.model
  config.encoder = ml_collections.ConfigDict(dict(
      embed_dim=64, num_layers=2, num_heads=2, mlp_dim=256, dropout=0.1,
      fusion="early"))  # or "late"
  config.userllm = ml_collections.ConfigDict(dict(
      method="cross_attention",
      strategy="full",  # full | adapters (needs adapter.kind) | frozen_llm | projector
      tasks=("next_title", "favourite_genre"),  # trained and evaluated (data/prompts.py)
      lm_tasks=("next_title", "favourite_genre"),  # LM pretraining from scratch
      text_ratings=False,  # text prompts show "(rating)" after each title
      eval_base=False,  # also score the test tasks before stage-3 training
      eval_valid=True,  # score the valid split after training (as well as test)
      history_len=50,  # events the encoder (or the text prompt) sees
      text_prompt_len=256,  # LLM context for text prompts (latest titles kept)
      lm_history=10,  # titles per prompt when pretraining the LM from scratch
      answer_len=0,  # 0: the longest title / genre + eos
      num_latents=16, perceiver_layers=1, perceiver_heads=2,
      cuts_per_user=4,  # training examples per user (x2 tasks)
      eval_users=300,  # held-out users scored (0: all)
      candidate_chunk=256))  # item titles scored per call
  # Adapters on the LLM's projections (userllm/adapters.py); trained alone by
  # userllm.strategy="adapters", or with the rest by "full".
  config.adapter = ml_collections.ConfigDict(dict(
      kind="none",  # none | lora | molora | mode | molora_sd
      rank=4, alpha=16.0, num_experts=4, top_k=0,
      router="token",  # token | task | token_task
      targets=("q", "k", "v", "out"),  # of q, k, v, out, gate, up, down
      match_params_of=""))  # a kind: pick rank to match its parameter count
  config.lm_train = _train(64, 800, 3e-3, 100)
  config.encoder_train = _train(128, 300, 3e-3, 50)
  config.train = _train(64, 600, 1e-3, 50, eval_every=300)
  return config
