"""Faults on a running `elastune up` stack (2 prefill + 2 decode processes, an external store): the store
killed and restarted empty, a prefill worker killed with prompts queued, a decode worker killed mid-stream.

Each test streams greedy completions through the official openai client while the fault happens and
compares every stream, token for token, with the same prompt's output from the healthy stack: a lost
token, a repeated token or a stream that ends early fails the test; so does a request that errors or
hangs (client timeout, no client retries)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.common.registry import WorkerDirectory
from services.common.store import connect
from services.proto import inference_pb2 as pb
from services.proto import inference_pb2_grpc as pb_grpc
from tests.fault.harness import (
    Prober, RestartableStore, children, client, health, prompt, start_up, stop_up, stream_tokens, wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store():
    s = RestartableStore()
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model, store):
    env = {**os.environ, "REDIS_URL": store.url}
    u = start_up(tmp_path_factory.mktemp("up"), ["--model", str(tiny_model), "--prefill", "2", "--decode", "2"], env)
    yield u
    stop_up(u)


def workers(store: RestartableStore, stage: str):
    async def read():
        r = connect(store.url)
        try:
            return await WorkerDirectory(r, "elastune").workers(stage)
        finally:
            await r.aclose()

    return asyncio.run(read())


def pid_of(worker_id: str) -> int:
    return int(worker_id.rsplit("-", 2)[1])  # hostname-pid-random (services.common.config._worker_id)


def admin(address: str) -> pb_grpc.AdminStub:
    return pb_grpc.AdminStub(grpc.insecure_channel(address))


def test_store_restart_services_reconnect_and_reregister(up, store):
    c = client(up.base)
    texts = [prompt(i, 2) for i in range(6)]
    with ThreadPoolExecutor(len(texts)) as pool:
        expected = list(pool.map(lambda t: stream_tokens(c, t, 160), texts))
        before = {s: {w.worker_id for w in workers(store, s)} for s in ("gateway", "prefill", "decode")}
        assert [len(before[s]) for s in ("gateway", "prefill", "decode")] == [1, 2, 2]
        with Prober(up.base) as prober:
            running = [pool.submit(stream_tokens, c, t, 160) for t in texts]
            time.sleep(0.3)
            store.kill()  # every connection cut, every key gone
            time.sleep(2.0)  # heartbeats and directory reads fail meanwhile; serving goes on
            store.restart()  # empty
            # every service re-registers with the same identity, and heartbeats keep the keys alive
            wait_for(lambda: {s: {w.worker_id for w in workers(store, s)} for s in before} == before, 15,
                     "every service re-registered in the restarted store")
            got = [f.result(timeout=90) for f in running]
            time.sleep(1.0)  # a few more probes on the new store
        assert got == expected
        assert prober.failures == [] and prober.done >= 3
    assert health(up.base) == {"prefill": 2, "decode": 2}
    time.sleep(4.0)  # longer than the heartbeat TTL: the reports stay because heartbeats resumed
    assert {s: {w.worker_id for w in workers(store, s)} for s in before} == before


def test_prefill_worker_killed_with_queued_prompts(up, store):
    c = client(up.base)
    texts = [prompt(100 + i, 120) for i in range(12)]  # ~360-token prompts: prefill takes a while
    with ThreadPoolExecutor(len(texts)) as pool:
        expected = list(pool.map(lambda t: stream_tokens(c, t), texts))
        victim, other = workers(store, "prefill")
        for w in (victim, other):  # one prompt per micro-batch: the rest queue (the tuner's own knob)
            admin(w.address).SetConfig(pb.RuntimeConfig(max_batch_size=1), timeout=10)
        running = [pool.submit(stream_tokens, c, t) for t in texts]
        deadline = time.monotonic() + 20
        while admin(victim.address).GetLoad(pb.Empty(), timeout=5).queue_len < 2:
            assert time.monotonic() < deadline, "no prompt queued at the prefill worker"
            time.sleep(0.01)
        os.kill(pid_of(victim.worker_id), signal.SIGKILL)
        got = [f.result(timeout=90) for f in running]
    assert got == expected  # decode prefilled the orphaned prompts itself; nothing lost or repeated
    wait_for(lambda: health(up.base).get("prefill") == 1, 10, "the dead prefill worker left routing")
    assert len(stream_tokens(c, prompt(200, 30))) == 64


def busy_worker(store, stage: str, at_least: int = 2):
    """Whichever worker of the stage first runs `at_least` sequences of the streams just sent
    (routing decides where they go, so the victim is picked by its load, not in advance)."""
    deadline = time.monotonic() + 20
    while True:
        for w in workers(store, stage):
            if admin(w.address).GetLoad(pb.Empty(), timeout=5).running_seqs >= at_least:
                return w
        assert time.monotonic() < deadline, f"no {stage} worker ran {at_least} sequences at once"
        time.sleep(0.01)


def test_decode_worker_frozen_mid_stream(up, store):
    """SIGSTOP: no RST, as when a node vanishes. Keepalive pings find the silent worker (services/common/
    server.py), the gateway resumes its streams elsewhere; once thawed, the worker registers again."""
    c = client(up.base)
    texts = [prompt(500 + i, i % 3) for i in range(6)]
    with ThreadPoolExecutor(len(texts)) as pool:
        expected = list(pool.map(lambda t: stream_tokens(c, t, 200), texts))
        running = [pool.submit(stream_tokens, c, t, 200) for t in texts]
        victim = busy_worker(store, "decode")
        os.kill(pid_of(victim.worker_id), signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            got = [f.result(timeout=60) for f in running]
            waited = time.monotonic() - frozen_at
        finally:
            os.kill(pid_of(victim.worker_id), signal.SIGCONT)
    assert got == expected
    assert waited < 30  # keepalive (about 10 s), not the request timeout (300 s)
    wait_for(lambda: victim.worker_id in {w.worker_id for w in workers(store, "decode")}, 15,
             "the thawed worker registered again")
    wait_for(lambda: health(up.base).get("decode") == 2, 15, "the thawed worker routed to again")


def test_decode_worker_killed_mid_stream(up, store):
    c = client(up.base)
    texts = [prompt(300 + i, i % 3) for i in range(8)]
    with ThreadPoolExecutor(len(texts)) as pool:
        expected = list(pool.map(lambda t: stream_tokens(c, t, 200), texts))
        running = [pool.submit(stream_tokens, c, t, 200) for t in texts]
        victim = busy_worker(store, "decode")
        os.kill(pid_of(victim.worker_id), signal.SIGKILL)
        got = [f.result(timeout=90) for f in running]
    assert got == expected  # resumed elsewhere from prompt + tokens so far: nothing lost or repeated
    assert all(len(t) == 200 for t in got)
    wait_for(lambda: health(up.base).get("decode") == 1, 10, "the dead decode worker left routing")
    assert pid_of(victim.worker_id) not in children(up.proc.pid, "decode")
