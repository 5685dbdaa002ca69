"""The committed stubs are exactly what `elastune protos` generates from protos/."""

from __future__ import annotations

from services.proto import generate


def test_generated_stubs_match_protos(tmp_path):
    fresh = {p.name: p.read_bytes() for p in generate.generate(tmp_path)}
    committed = {name: (generate.OUT_DIR / name).read_bytes() for name in fresh}
    drifted = [name for name in fresh if fresh[name] != committed[name]]
    assert not drifted, f"stubs drifted from protos/: {drifted}; run `elastune protos`"
    assert {"inference_pb2.py", "inference_pb2_grpc.py"} <= fresh.keys()
