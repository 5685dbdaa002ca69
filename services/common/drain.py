"""`elastune drain`: ask a worker to drain through its Admin RPC (a Kubernetes preStop hook runs it).

Kept free of torch and the model code: the hook starts a fresh interpreter inside a pod that is
shutting down, and must not load what the worker already holds.
"""

from __future__ import annotations

import grpc

from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc

CALL_MARGIN_S = 10.0  # the worker answers at most grace_s after the call; allow for the hop and shutdown


def drain(address: str, grace_s: float = 0.0) -> int:
    """Admin.Drain on the worker at `address`; return the sequences still running when it answered.

    The worker stops taking requests at once (it reports itself draining, so routers skip it), hands
    running decode sequences to peers or finishes them, and answers within `grace_s` (0: its own
    drain_grace_s). Raises grpc.RpcError when the worker cannot be reached.
    """
    timeout = (grace_s or 3600.0) + CALL_MARGIN_S
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.AdminStub(channel).Drain(pb.DrainRequest(grace_s=grace_s), timeout=timeout)
    return reply.remaining
