"""Benchmarks: experiments that run a workflow (or its round) several ways,
grouped by the package they measure (federated/, userllm/, summarize/), each
through the one harness (harness.py: flags, settings -> rows, and
`<out>.json`, `<out>.md`, `<out>.png` with the command, commit, device, date
and which split chose what). Run as modules, e.g.
`python -m benchmarks.federated.compression --out benchmarks/results/...`;
every output lives in benchmarks/results/ and the docs quote them from there
(tests/test_provenance.py checks that each exists and that its recorded
command still parses)."""
