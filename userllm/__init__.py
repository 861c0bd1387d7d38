"""User-LLM: user encoders over activity timelines and their use in an LLM."""
