"""Benchmarks of RLPF (summarize/): the quality table of finished runs, how
much the histories hold, what RL's samples write, how faithfully the initial
policy copies titles, and the speed of rollouts and RL steps; one module per
question, `python -m benchmarks.summarize.rlpf_<name> ...`; outputs go to
benchmarks/results/."""
