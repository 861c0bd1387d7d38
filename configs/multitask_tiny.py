"""A seconds-long multi-task adapter config for tests."""

from configs import multitask, user_llm_tiny


def get_config():
  config = user_llm_tiny.get_config()
  tiny_sizes = {k: dict(config[k]) for k in ("llm", "data", "userllm", "mesh")}
  schedules = {k: dict(config[k]) for k in ("lm_train", "train")}
  config = multitask.get_config()
  for key, fields in {**tiny_sizes, **schedules}.items():
    keep = {k: v for k, v in fields.items()
            if key != "userllm" or k in ("history_len", "text_prompt_len",
                                         "lm_history", "cuts_per_user",
                                         "eval_users", "candidate_chunk")}
    config[key].update(keep)
  config.adapter.update(rank=2, num_experts=2)
  return config
