"""A seconds-long User-LLM config for tests."""

from configs import tiny, user_llm


def get_config():
  config = user_llm.get_config()
  config.model = config.encoder  # tiny.shrink shrinks config.model
  tiny.shrink(config)
  del config.model
  config.llm.update(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=16, mlp_dim=64)
  config.encoder.update(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                        dropout=0.0)
  config.userllm.update(history_len=8, text_prompt_len=48, lm_history=3,
                        num_latents=4, cuts_per_user=2, eval_users=16,
                        candidate_chunk=64)
  for train in (config.lm_train, config.encoder_train, config.train):
    train.update(batch_size=16, num_steps=4, warmup_steps=1, log_every=2,
                 checkpoint_every=2, eval_batch_size=8)
  config.train.eval_every = 0  # valid and test are scored once, at the end
  return config
