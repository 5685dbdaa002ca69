"""The inner loop: tuning table, knee profiling and per-share runtime config selection.

table.py      the tuning table (store + JSON), per-share estimates, capacity
knee.py       knee finding, the adaptive (bisecting) knee search
profiler.py   `elastune profile`: adaptive rounds, one probe process per share
probe.py      the process at one share that times the workers' own step code
shares.py     CPU threads + affinity / CUDA MPS / MIG shares, share detection, the MPS daemon
selection.py  config choice with hysteresis, the prefill/decode share split
policy.py     the sidecar's per-tick decision (pure): share changes, dwell, exploration, observations
sidecar.py    the sidecar loop: GetLoad -> decide -> SetConfig, observations back to the table
capacity.py   per-pod capacity from the table, for the scaler
config.py     the sidecar's settings; metrics.py its Prometheus metrics; commands.py the CLI
"""
