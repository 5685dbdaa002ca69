"""The Prefill stream's hand-made KV chunk codec (services/common/kv_wire.py) is wire-compatible
with the generated protobuf classes in both directions, and its decoded data is the bytes sent."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.kv_wire import KvChunkData, decode_prefill_chunk, encode_prefill_chunk
from services.proto import inference_pb2 as pb


@pytest.mark.parametrize("sizes", [[0], [5], [200, 3], [1 << 21, 1 << 20 | 7]])  # multi-byte lengths too
@pytest.mark.parametrize("start", [0, 3, 300])
def test_grpc_chunk_encodes_to_what_protobuf_reads(sizes, start):
    rng = np.random.default_rng(len(sizes) + start)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    nbytes = sum(sizes)
    chunk = KvChunkData(start, start + len(parts), nbytes, parts=parts)
    msg = pb.PrefillChunk.FromString(encode_prefill_chunk(chunk))
    assert msg.WhichOneof("kind") == "kv"
    assert (msg.kv.layer_start, msg.kv.layer_end, msg.kv.nbytes, msg.kv.shm_offset) == (start, start + len(parts), nbytes, 0)
    assert msg.kv.data == b"".join(p.tobytes() for p in parts)


@pytest.mark.parametrize("offset", [0, 1, 1 << 40])
def test_protobuf_chunks_decode_to_views_of_the_same_bytes(offset):
    data = bytes(range(256)) * 40
    wire = pb.PrefillChunk(kv=pb.KvChunk(layer_start=2, layer_end=4, data=data, shm_offset=offset, nbytes=len(data)))
    raw = wire.SerializeToString()
    got = decode_prefill_chunk(raw)
    assert isinstance(got, KvChunkData)
    assert (got.layer_start, got.layer_end, got.nbytes, got.shm_offset) == (2, 4, len(data), offset)
    assert isinstance(got.data, memoryview) and got.data.obj is raw  # a view, not a copy
    assert bytes(got.data) == data


def test_shm_chunk_round_trip_has_no_data():
    chunk = KvChunkData(1, 3, 4096, shm_offset=2048)
    got = decode_prefill_chunk(encode_prefill_chunk(chunk))
    assert (got.layer_start, got.layer_end, got.nbytes, got.shm_offset, bytes(got.data)) == (1, 3, 4096, 2048, b"")


def test_head_and_first_messages_pass_through_protobuf():
    head = pb.PrefillChunk(head=pb.PrefillHead(layout=pb.KvLayout(dtype="bfloat16", layer_shape=[2, 8, 9, 128],
                                                                  num_layers=32), transport="grpc", queue_ms=1.5))
    first = pb.PrefillChunk(first=pb.PrefillFirst(token_id=1234, compute_ms=2.0))
    for msg in (head, first):
        got = decode_prefill_chunk(encode_prefill_chunk(msg))
        assert isinstance(got, pb.PrefillChunk) and got == msg
