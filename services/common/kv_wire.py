"""The Prefill stream's KV chunks on the wire without protobuf copying their bytes.

A KV layer of a Llama-3-8B-shaped 2,048-token prompt is 8 MiB. Through the generated
protobuf classes it was copied six times per side (tensor -> bytes -> KvChunk -> PrefillChunk
-> serialized, and back: parse -> field access -> bytearray), which cost more than gRPC
itself. Here the wire format stays exactly `PrefillChunk{kv: KvChunk}` (any protobuf client
can read it), but:
- the sender encodes a `KvChunkData` by hand: one join of a few header bytes and the layers'
  memory, straight from the tensors;
- the receiver decodes a kv message by hand into a `KvChunkData` whose `data` is a
  memoryview into the received bytes (no copy); head and first-token messages, small, go
  through the generated classes.
Only the Prefill method uses it (`add_prefill_servicer`, `prefill_method`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from ..proto import inference_pb2 as pb

PREFILL_SERVICE = "elastune.v1.Prefill"
PREFILL_METHOD = f"/{PREFILL_SERVICE}/Prefill"

_LEN, _VARINT = 2, 0
_KV_FIELD = 2  # PrefillChunk.kv
# KvChunk fields
_LAYER_START, _LAYER_END, _DATA, _SHM_OFFSET, _NBYTES = 1, 2, 3, 4, 5


@dataclass
class KvChunkData:
    """A KvChunk: layers [layer_start, layer_end); `parts` (sender) or `data` (receiver) hold
    the bytes of transport grpc; shm / cuda_ipc chunks carry only the offset."""

    layer_start: int
    layer_end: int
    nbytes: int
    shm_offset: int = 0
    parts: list = field(default_factory=list, repr=False)  # buffers, joined when encoded
    data: memoryview | bytes = b""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, pos
        shift += 7


def encode_prefill_chunk(msg: pb.PrefillChunk | KvChunkData) -> bytes:
    if isinstance(msg, pb.PrefillChunk):
        return msg.SerializeToString()
    data_len = sum(memoryview(p).nbytes for p in msg.parts)
    head = b"".join(
        _tag(number, _VARINT) + _varint(value)
        for number, value in ((_LAYER_START, msg.layer_start), (_LAYER_END, msg.layer_end))
        if value  # proto3 leaves zeros out
    )
    tail = b"".join(
        _tag(number, _VARINT) + _varint(value)
        for number, value in ((_SHM_OFFSET, msg.shm_offset), (_NBYTES, msg.nbytes))
        if value
    )
    data_head = _tag(_DATA, _LEN) + _varint(data_len) if data_len else b""
    inner_len = len(head) + len(data_head) + data_len + len(tail)
    return b"".join([_tag(_KV_FIELD, _LEN), _varint(inner_len), head, data_head, *msg.parts, tail])


def decode_prefill_chunk(raw: bytes) -> pb.PrefillChunk | KvChunkData:
    buf = memoryview(raw)
    if not raw or raw[0] != _KV_FIELD << 3 | _LEN:
        return pb.PrefillChunk.FromString(raw)
    inner_len, pos = _read_varint(buf, 1)
    end = pos + inner_len
    if end != len(raw):  # not the one-field message we write: let protobuf make sense of it
        return pb.PrefillChunk.FromString(raw)
    values = {_LAYER_START: 0, _LAYER_END: 0, _SHM_OFFSET: 0, _NBYTES: 0}
    data = b""
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            values[number], pos = _read_varint(buf, pos)
        elif wire_type == _LEN:
            size, pos = _read_varint(buf, pos)
            if number == _DATA:
                data = buf[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"KV chunk field {number} has wire type {wire_type}, not one KvChunk uses")
    return KvChunkData(values[_LAYER_START], values[_LAYER_END], values[_NBYTES], values[_SHM_OFFSET], data=data)


def add_prefill_servicer(servicer, server: grpc.aio.Server) -> None:
    """Like the generated add_PrefillServicer_to_server, with the KV-chunk encoder."""
    handlers = {
        "Prefill": grpc.unary_stream_rpc_method_handler(
            servicer.Prefill, request_deserializer=pb.PrefillRequest.FromString,
            response_serializer=encode_prefill_chunk,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PREFILL_SERVICE, handlers),))


def prefill_method(channel: grpc.aio.Channel):
    """Prefill(request) -> stream of pb.PrefillChunk (head, first) and KvChunkData (kv)."""
    return channel.unary_stream(
        PREFILL_METHOD, request_serializer=pb.PrefillRequest.SerializeToString,
        response_deserializer=decode_prefill_chunk,
    )
