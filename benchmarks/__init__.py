"""Benchmarks: experiments that run a workflow (or its round) several ways and
write `<out>.json` + `<out>.md` through `infra/results.py`. Run as modules,
e.g. `python -m benchmarks.adapters --config configs/multitask.py --out ...`;
their outputs live beside them and the README quotes them."""
