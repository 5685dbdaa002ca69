"""The inner loop: tuning table, knee profiling and per-share runtime config selection."""
