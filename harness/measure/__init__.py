"""Measurements of a model: FLOPs (flops.py), latency (latency.py), routing statistics and
churn (analysis.py), and the fixed probe text they run on (probe.py)."""
