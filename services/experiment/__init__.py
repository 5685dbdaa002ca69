"""Experiments: workloads, baselines and ablations, runs in the simulator or on the local stack, reports."""
