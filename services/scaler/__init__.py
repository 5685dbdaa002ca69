"""KEDA external scaler for each stage."""
