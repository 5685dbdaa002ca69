"""MoE experts service (placeholder until its own issue)."""
