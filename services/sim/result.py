"""What a simulated (or real) run produces, as plain columns. Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageSample:
    """One stage at one poll."""

    time: float
    stage: str
    ready: int
    starting: int  # placed, cold-starting
    unplaced: int  # asked for, no GPU room yet
    draining: int
    target: int  # what the autoscaler asked for
    share: float  # GPU share allocated to the stage's pods (all states but gone)
    load_tokens_per_s: float  # the stage's arrival rate (prompt tokens for prefill, output for decode)
    queue_len: int


@dataclass
class ScaleChange:
    time: float
    stage: str
    from_replicas: int
    to_replicas: int


@dataclass
class RunData:
    """Per-request columns (index = request), latency samples, and the replica timeline.

    status: "ok", or why not ("timeout": unfinished at the end of the run, "error: ...").
    ttft_s, e2e_s, tpot_s: None where unknown. queue_s: waiting before prefill started
    (decode admission + prefill queue); prefill_s: prefill compute + KV hand-off.
    itl: weighted inter-token gap samples (seconds, weight = how many gaps took that long).
    """

    arrival_s: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    ttft_s: list[float | None] = field(default_factory=list)
    e2e_s: list[float | None] = field(default_factory=list)
    tpot_s: list[float | None] = field(default_factory=list)
    queue_s: list[float | None] = field(default_factory=list)
    prefill_s: list[float | None] = field(default_factory=list)
    itl_values: list[float] = field(default_factory=list)
    itl_weights: list[float] = field(default_factory=list)
    timeline: list[StageSample] = field(default_factory=list)
    changes: list[ScaleChange] = field(default_factory=list)
    duration_s: float = 0.0  # the span the GPU figures cover
    share_seconds: float = 0.0  # sum over pods of share x seconds placed (GPU-seconds)
    gpu_seconds_occupied: float = 0.0  # whole GPUs with at least one pod, x seconds
    share_seconds_by_stage: dict[str, float] = field(default_factory=dict)  # share_seconds split by stage
    stats: dict = field(default_factory=dict)  # simulator counters (events, wall time, ...)

    def __len__(self) -> int:
        return len(self.arrival_s)
