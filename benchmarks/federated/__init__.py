"""Benchmarks of the federated workflow (federated/): the round's throughput,
privacy, compression, personalisation, retrieval and mixed FL. Run each as
`python -m benchmarks.federated.<name> ...`; outputs go to benchmarks/results/."""
