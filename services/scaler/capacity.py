"""Per-pod capacity for a decision: from the tuning table at the pods' share when the table
profiles the stage's model on its device, else the trigger's tokensPerSecondPerPod.

The table is re-read only when its version moved (one HGET per decision otherwise). The share
planned with is the smallest among the stage's live pods (plan for the weakest pod), and the
SLO the capacity must meet is the trigger's: sloItlSeconds for decode (a decode step is one
inter-token gap), sloTtftSeconds for prefill (a micro-batch is the compute part of TTFT), and
sloItlSeconds for an expert group (`experts/<group>`, whose table rows are the "experts" ones:
one expert micro-batch holds up every decode step that routes tokens to the group).
"""

from __future__ import annotations

import math
from dataclasses import replace

import redis.asyncio as aioredis
import structlog

from ..common import keys
from ..tuner.capacity import TableCapacity, resolve_device
from ..tuner.table import TuningTable, table_stage
from .signal_source import StageView
from .signals import StagePolicyConfig

log = structlog.get_logger(__name__)


class TableCapacitySource:
    def __init__(self, store: aioredis.Redis):
        self._store = store
        self._tables: dict[str, TuningTable] = {}  # prefix -> last table read

    async def _table(self, prefix: str) -> TuningTable | None:
        version = await self._store.hget(keys.tuning_table(prefix), "version")
        if version is None:
            return None
        cached = self._tables.get(prefix)
        if cached is None or cached.version != int(version):
            try:
                cached = await TuningTable.load(self._store, prefix)
            except (ValueError, KeyError, TypeError) as exc:  # a bad table must not stop scaling
                log.warning("scaler.bad_tuning_table", prefix=prefix, error=repr(exc))
                return None
            self._tables[prefix] = cached
        return cached

    async def policy_for(self, prefix: str, policy: StagePolicyConfig, view: StageView) -> StagePolicyConfig:
        """`policy` with its per-pod capacity from the table, when the table knows the stage."""
        if not view.model or not view.shares or isinstance(policy.tokens_per_s_per_pod, TableCapacity):
            return policy
        table = await self._table(prefix)
        if table is None:
            return policy
        stage = table_stage(policy.stage)
        device = resolve_device(table, view.model, stage, view.device)
        if not table.shares(view.model, stage, device):
            return policy
        slo_s = policy.slo_ttft_s if stage == "prefill" else policy.slo_itl_s
        fallback = policy.pod_tokens_per_s()
        capacity = TableCapacity(table, view.model, stage, device,
                                 slo_s * 1000.0 if slo_s else math.inf, fallback)
        return replace(policy, tokens_per_s_per_pod=capacity, gpu_share=min(view.shares))
