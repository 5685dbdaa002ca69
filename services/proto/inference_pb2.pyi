from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_queue_ms", "prefill_queue_ms", "prefill_compute_ms", "kv_transfer_ms")
    DECODE_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    decode_queue_ms: float
    prefill_queue_ms: float
    prefill_compute_ms: float
    kv_transfer_ms: float
    def __init__(self, decode_queue_ms: _Optional[float] = ..., prefill_queue_ms: _Optional[float] = ..., prefill_compute_ms: _Optional[float] = ..., kv_transfer_ms: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "prompt_token_ids", "sampling", "stop", "timeout_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    timeout_s: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage", "timings", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    usage: Usage
    timings: StageTimings
    request_id: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "prefill_address", "deadline_unix_s", "prefill_host_id", "sampling_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    prefill_address: str
    deadline_unix_s: float
    prefill_host_id: str
    sampling_offset: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., prefill_address: _Optional[str] = ..., deadline_unix_s: _Optional[float] = ..., prefill_host_id: _Optional[str] = ..., sampling_offset: _Optional[int] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "timings", "migrated_to", "migration_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_TO_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    timings: StageTimings
    migrated_to: str
    migration_id: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., migrated_to: _Optional[str] = ..., migration_id: _Optional[str] = ...) -> None: ...

class AdoptHead(_message.Message):
    __slots__ = ("request_id", "token_ids", "prompt_len", "sampling", "sampling_offset", "layout")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_len: int
    sampling: SamplingParams
    sampling_offset: int
    layout: KvLayout
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_len: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., sampling_offset: _Optional[int] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ...) -> None: ...

class AdoptChunk(_message.Message):
    __slots__ = ("head", "kv")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    head: AdoptHead
    kv: KvChunk
    def __init__(self, head: _Optional[_Union[AdoptHead, _Mapping]] = ..., kv: _Optional[_Union[KvChunk, _Mapping]] = ...) -> None: ...

class AdoptResponse(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class KvTarget(_message.Message):
    __slots__ = ("host_id", "shm_path", "shm_bytes", "cuda_ipc", "tcp_address", "tcp_token")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    SHM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    TCP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TCP_TOKEN_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    shm_path: str
    shm_bytes: int
    cuda_ipc: CudaIpcBuffer
    tcp_address: str
    tcp_token: bytes
    def __init__(self, host_id: _Optional[str] = ..., shm_path: _Optional[str] = ..., shm_bytes: _Optional[int] = ..., cuda_ipc: _Optional[_Union[CudaIpcBuffer, _Mapping]] = ..., tcp_address: _Optional[str] = ..., tcp_token: _Optional[bytes] = ...) -> None: ...

class CudaIpcBuffer(_message.Message):
    __slots__ = ("device_uuid", "handle", "storage_bytes", "storage_offset", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "nbytes")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    handle: bytes
    storage_bytes: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    nbytes: int
    def __init__(self, device_uuid: _Optional[str] = ..., handle: _Optional[bytes] = ..., storage_bytes: _Optional[int] = ..., storage_offset: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "kv_target", "sampling_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KV_TARGET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    kv_target: KvTarget
    sampling_offset: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., kv_target: _Optional[_Union[KvTarget, _Mapping]] = ..., sampling_offset: _Optional[int] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("dtype", "layer_shape", "num_layers")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYER_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    layer_shape: _containers.RepeatedScalarFieldContainer[int]
    num_layers: int
    def __init__(self, dtype: _Optional[str] = ..., layer_shape: _Optional[_Iterable[int]] = ..., num_layers: _Optional[int] = ...) -> None: ...

class PrefillHead(_message.Message):
    __slots__ = ("layout", "transport", "queue_ms")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    layout: KvLayout
    transport: str
    queue_ms: float
    def __init__(self, layout: _Optional[_Union[KvLayout, _Mapping]] = ..., transport: _Optional[str] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class PrefillFirst(_message.Message):
    __slots__ = ("token_id", "compute_ms")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    compute_ms: float
    def __init__(self, token_id: _Optional[int] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("layer_start", "layer_end", "data", "shm_offset", "nbytes")
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    layer_start: int
    layer_end: int
    data: bytes
    shm_offset: int
    nbytes: int
    def __init__(self, layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., data: _Optional[bytes] = ..., shm_offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PrefillChunk(_message.Message):
    __slots__ = ("head", "kv", "first")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    head: PrefillHead
    kv: KvChunk
    first: PrefillFirst
    def __init__(self, head: _Optional[_Union[PrefillHead, _Mapping]] = ..., kv: _Optional[_Union[KvChunk, _Mapping]] = ..., first: _Optional[_Union[PrefillFirst, _Mapping]] = ...) -> None: ...

class RuntimeConfig(_message.Message):
    __slots__ = ("max_batch_size", "max_concurrency", "prefill_chunk_size", "local_prefill_threshold", "version")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_concurrency: int
    prefill_chunk_size: int
    local_prefill_threshold: int
    version: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., prefill_chunk_size: _Optional[int] = ..., local_prefill_threshold: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("worker_id", "stage", "address", "host_id", "model", "timestamp_unix", "queue_len", "queued_tokens", "running_seqs", "kv_used_tokens", "kv_capacity_tokens", "prompt_tokens_per_s", "output_tokens_per_s", "step_ms_p50", "step_ms_p95", "oldest_deadline_slack_s", "gpu_share", "device", "config", "draining", "ttft_ms_p95", "itl_ms_p95", "step_model")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LEN_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_P50_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_P95_FIELD_NUMBER: _ClassVar[int]
    OLDEST_DEADLINE_SLACK_S_FIELD_NUMBER: _ClassVar[int]
    GPU_SHARE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_P95_FIELD_NUMBER: _ClassVar[int]
    ITL_MS_P95_FIELD_NUMBER: _ClassVar[int]
    STEP_MODEL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    stage: str
    address: str
    host_id: str
    model: str
    timestamp_unix: float
    queue_len: int
    queued_tokens: int
    running_seqs: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    step_ms_p50: float
    step_ms_p95: float
    oldest_deadline_slack_s: float
    gpu_share: float
    device: str
    config: RuntimeConfig
    draining: bool
    ttft_ms_p95: float
    itl_ms_p95: float
    step_model: StepTimeModel
    def __init__(self, worker_id: _Optional[str] = ..., stage: _Optional[str] = ..., address: _Optional[str] = ..., host_id: _Optional[str] = ..., model: _Optional[str] = ..., timestamp_unix: _Optional[float] = ..., queue_len: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., running_seqs: _Optional[int] = ..., kv_used_tokens: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., prompt_tokens_per_s: _Optional[float] = ..., output_tokens_per_s: _Optional[float] = ..., step_ms_p50: _Optional[float] = ..., step_ms_p95: _Optional[float] = ..., oldest_deadline_slack_s: _Optional[float] = ..., gpu_share: _Optional[float] = ..., device: _Optional[str] = ..., config: _Optional[_Union[RuntimeConfig, _Mapping]] = ..., draining: _Optional[bool] = ..., ttft_ms_p95: _Optional[float] = ..., itl_ms_p95: _Optional[float] = ..., step_model: _Optional[_Union[StepTimeModel, _Mapping]] = ...) -> None: ...

class StepTimeModel(_message.Message):
    __slots__ = ("base_ms", "per_decode_ms", "per_prefill_ms", "per_context_ms", "samples")
    BASE_MS_FIELD_NUMBER: _ClassVar[int]
    PER_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PER_PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    PER_CONTEXT_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    base_ms: float
    per_decode_ms: float
    per_prefill_ms: float
    per_context_ms: float
    samples: int
    def __init__(self, base_ms: _Optional[float] = ..., per_decode_ms: _Optional[float] = ..., per_prefill_ms: _Optional[float] = ..., per_context_ms: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("grace_s",)
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    grace_s: float
    def __init__(self, grace_s: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("remaining",)
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    remaining: int
    def __init__(self, remaining: _Optional[int] = ...) -> None: ...
