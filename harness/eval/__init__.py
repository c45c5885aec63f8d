"""Evaluation: the benchmark registry (benchmarks.py), the packed scorer (packed_scoring.py)
and its lm-eval adapter (shared_prefix.py), held-out loss and KL (heldout.py), and the
`python -m harness.eval` command (cli.py)."""
