"""Cluster simulator: discrete-event, the same scaler policy and KEDA/HPA code on a simulated clock."""
