"""Shared infrastructure: mesh and sharding rules, checkpoints, the train loop,
metric writing, ranking metrics. Every workflow package builds on these."""
