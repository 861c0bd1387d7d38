"""Benchmarks of User-LLM (userllm/) and its multi-task adapters, and the LLM
FLOPs at Gemma scale. Run each as `python -m benchmarks.userllm.<name> ...`;
outputs go to benchmarks/results/."""
