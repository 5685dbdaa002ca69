"""The load report every worker publishes about once a second (DESIGN.md section 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..engine.profile import ServiceTimeModel
from ..proto import inference_pb2 as pb
from .runtime_config import RuntimeConfig

_MESSAGES = ("config", "extra", "step_model")  # not plain scalar fields


@dataclass(frozen=True)
class LoadReport:
    worker_id: str
    stage: str
    address: str
    host_id: str
    model: str
    timestamp_unix: float
    queue_len: int = 0
    queued_tokens: int = 0
    running_seqs: int = 0
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    prompt_tokens_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    step_ms_p50: float = 0.0
    step_ms_p95: float = 0.0
    oldest_deadline_slack_s: float = math.inf
    gpu_share: float = 1.0
    device: str = "cpu"
    config: RuntimeConfig | None = None
    draining: bool = False
    ttft_ms_p95: float = 0.0
    itl_ms_p95: float = 0.0
    step_model: ServiceTimeModel | None = None  # decode: fitted step time (tuner, scaler, simulator)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def kv_free_tokens(self) -> int:
        return max(self.kv_capacity_tokens - self.kv_used_tokens, 0)

    def to_bytes(self) -> bytes:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _MESSAGES}
        msg = pb.LoadReport(**values)
        if self.config is not None:
            msg.config.CopyFrom(self.config.to_proto())
        if self.step_model is not None:
            m = self.step_model
            msg.step_model.CopyFrom(pb.StepTimeModel(
                base_ms=m.base_ms, per_decode_ms=m.per_decode_ms, per_prefill_ms=m.per_prefill_ms,
                per_context_ms=m.per_context_ms, samples=m.samples))
        return msg.SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LoadReport":
        msg = pb.LoadReport.FromString(data)
        values = {f.name: getattr(msg, f.name) for f in fields(cls) if f.name not in _MESSAGES}
        config = RuntimeConfig.from_proto(msg.config) if msg.HasField("config") else None
        step_model = None
        if msg.HasField("step_model"):
            m = msg.step_model
            step_model = ServiceTimeModel(m.base_ms, m.per_decode_ms, m.per_prefill_ms, m.per_context_ms, m.samples)
        return cls(**values, config=config, step_model=step_model)
