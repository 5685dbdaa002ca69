"""Keepalive (services/common/server.py GRPC_OPTIONS): a stream from a peer that froze, sending no RST as
when its node vanishes, fails UNAVAILABLE within about two keepalive periods instead of hanging."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import GRPC_OPTIONS, KEEPALIVE_MS

SERVER = """
import asyncio, grpc
from grpc_health.v1 import health, health_pb2_grpc
from services.common.server import GRPC_OPTIONS

async def main():
    server = grpc.aio.server(options=GRPC_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def test_a_frozen_peer_is_declared_gone_within_two_keepalive_periods():
    peer = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = peer.stdout.readline().strip()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(2 * KEEPALIVE_MS / 1000)  # a healthy idle stream is not cut by pings
            peer.send_signal(signal.SIGSTOP)
            frozen = time.monotonic()
            try:
                await asyncio.wait_for(watch.read(), timeout=4 * KEEPALIVE_MS / 1000)
                raise AssertionError("the stream of a frozen peer yielded a message")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - frozen <= 2 * KEEPALIVE_MS / 1000 + 2
    finally:
        os.kill(peer.pid, signal.SIGKILL)
        peer.wait()
