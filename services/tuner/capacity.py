"""Per-pod capacity from the tuning table, for the scaler (the outer loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .table import TuningTable, table_stage


def resolve_device(table: TuningTable, model: str, stage: str, reported: str) -> str:
    """The table's device key for a worker that reports `reported` ("cpu", "cuda", "cuda:0"):
    "cpu" for a CPU worker; for a GPU worker, the GPU the table has for this model and stage
    (workers report the torch device, the profiler the GPU's name). `stage` may be a worker's
    (experts/<group>)."""
    if reported == "cpu" or not reported:
        return "cpu"
    stage = table_stage(stage)
    gpus = [d for m, s, d in table.groups() if m == model and s == stage and d != "cpu"]
    return gpus[0] if gpus else reported


@dataclass(frozen=True)
class TableCapacity:
    """Tokens/s one pod at a share carries within the SLO, per the table (scaler CapacityModel).

    Falls back to `fallback` (the trigger's tokensPerSecondPerPod) where the table has nothing
    that meets the SLO near the share."""

    table: TuningTable
    model: str
    stage: str
    device: str
    slo_p95_ms: float = math.inf
    fallback: float = 1000.0

    def tokens_per_s(self, share: float) -> float:
        cap = self.table.capacity_tokens_per_s(self.model, self.stage, self.device, share, self.slo_p95_ms)
        return cap if cap is not None and cap > 0 else self.fallback
