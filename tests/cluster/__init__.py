"""Fault-injection cluster: real daemons in network namespaces, a recorded workload, faults
combined from a seed, a checker over the history and a timeline plot.

Everything on the host is named `wic-*` / `wicbr*`, uses only 198.18.0.0/15 and is removed
in finally blocks.  Entry point: `tests.cluster.run.run_chaos` (used by tests/test_chaos.py).
"""
