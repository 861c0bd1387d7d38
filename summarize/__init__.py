"""User summaries: RLPF (summaries trained by prediction feedback), UserSumBench's
metrics, a time-hierarchical summarizer and a self-critique verifier."""
