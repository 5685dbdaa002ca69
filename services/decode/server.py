"""Decode worker: reserves KV, gets the prompt's KV from a prefill worker, streams tokens."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

import grpc
import structlog
import torch

from ..common.convert import BadRequest, check_prompt, sampling_from_proto, sampling_to_proto
from ..common.kv_cuda_ipc import DeviceBuffer
from ..common.kv_tcp import KvTcpServer
from ..common.kv_transport import CUDA_IPC, SHM, TCP, KvLayout, KvReceiver, ShmPool, host_id
from ..common.kv_wire import KvChunkData, prefill_method
from ..common.registry import WorkerDirectory
from ..common.request_context import outgoing_metadata
from ..common.tasks import raise_if_cancelling, spawn
from ..common.runtime_config import RuntimeConfig
from ..common.server import GRPC_OPTIONS
from ..common.types import FinishReason
from ..common.worker import Worker
from ..engine.block_manager import blocks_for_tokens
from ..engine.kv_cache import kv_budget_bytes
from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from .config import DecodeConfig
from .engine import DecodeEngine
from .metrics import DecodeMetrics
from .migration import MIGRATED, Migrations
from .sequence import Sequence

log = structlog.get_logger(__name__)

RETRY_AFTER_MS = 250
RECHECK_S = 1.0  # a request waiting for KV space looks again at least this often


class Overloaded(Exception):
    pass


class DecodeWorker(Worker):
    name = stage = "decode"

    def __init__(self, config: DecodeConfig):
        runtime = RuntimeConfig(
            max_batch_size=config.max_batch_size,
            max_concurrency=config.max_concurrency,
            local_prefill_threshold=config.local_prefill_threshold,
        )
        super().__init__(config, runtime)
        self.engine: DecodeEngine | None = None
        self._slot_freed: asyncio.Condition | None = None
        self._waiting: dict[object, int] = {}  # waiter -> prompt tokens, for the load report
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.kv_sources: Counter[str] = Counter()  # where prompt KV came from: shm, grpc, local
        self.sequences: set[Sequence] = set()  # streaming to a client through this worker
        self.migrations = Migrations(self, config.adopt_timeout_s)
        self.shm_pool = ShmPool()  # shared-memory files offered to prefill workers on this host
        self.kv_tcp: KvTcpServer | None = None  # the socket prefill workers on other hosts send KV to
        self.kv_tcp_address = ""
        # shipped KV is copied into blocks here, not on the event loop (256 MiB: ~0.3 s)
        self._kv_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-kv-write")
        self._expiry_task: asyncio.Task | None = None
        self.metrics = DecodeMetrics(self)

    def add_servicers(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_DecodeServicer_to_server(DecodeServicer(self), server)
        self.add_admin(server)

    async def on_start(self) -> None:
        cfg: DecodeConfig = self.config
        self._slot_freed = asyncio.Condition()
        mc = self.runner.config
        budget = cfg.kv_cache_bytes or cfg.kv_slots * mc.max_model_len * mc.kv_bytes_per_token(
            torch.empty(0, dtype=self.runner.dtype).element_size()
        )
        self.engine = DecodeEngine(
            self.runner, cfg.kv_slots, self.runtime.max_batch_size, asyncio.get_running_loop(),
            kv_budget_bytes=kv_budget_bytes(self.runner.device, budget, cfg.kv_gpu_fraction),
            block_size=cfg.kv_block_size, token_budget=cfg.step_token_budget, chunk_size=self.runtime.prefill_chunk_size,
            swap_bytes=cfg.swap_space_bytes, swap_min_tokens=cfg.swap_min_tokens, mirror=cfg.decode_mirror,
        )
        self.engine.on_slot_freed = self._notify_slot_freed
        self.engine.start()
        if cfg.offers_tcp:
            self.kv_tcp = KvTcpServer(cfg.host, cfg.kv_tcp_port, cfg.kv_tcp_timeout_s)
            self.kv_tcp_address = cfg.advertised(self.kv_tcp.start())
        self._expiry_task = spawn(self._expire_parked(), name="decode.adopt_expiry")
        await super().on_start()

    async def _expire_parked(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.migrations.expire()

    def apply_config(self, runtime: RuntimeConfig) -> None:
        runtime.validate(slots=self.config.kv_slots)
        super().apply_config(runtime)
        self.engine.scheduler.max_batch_size = runtime.max_batch_size  # next step boundary
        self.engine.scheduler.chunk_size = runtime.prefill_chunk_size
        self._notify_slot_freed()  # a higher max_concurrency may admit waiters now

    def _notify_slot_freed(self) -> None:
        async def notify():
            async with self._slot_freed:
                self._slot_freed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def reserve(self, seq: Sequence, deadline: float) -> None:
        """Wait for a seat and KV blocks for the prompt (bounded queue, deadline)."""
        if len(self._waiting) >= self.config.max_waiting:
            raise Overloaded(f"decode worker has {len(self._waiting)} requests waiting for KV space")
        token = object()
        self._waiting[token] = len(seq.tokens)
        try:
            async with self._slot_freed:
                while True:
                    if self.draining:
                        raise Overloaded("decode worker is draining")
                    if self.engine.slots.used < self.runtime.max_concurrency and self.engine.reserve(seq):
                        return
                    left = RECHECK_S if deadline == 0 else deadline - time.time()
                    if left <= 0:
                        raise asyncio.TimeoutError
                    try:  # woken when a seat or blocks are freed; rechecks anyway now and then
                        await asyncio.wait_for(self._slot_freed.wait(), min(left, RECHECK_S))
                    except TimeoutError:
                        pass
        finally:
            del self._waiting[token]

    async def write_kv(self, seq: Sequence, layers: list[tuple[int, torch.Tensor]]) -> None:
        """Copy shipped KV, (layer, [2, KVH, T, D]) pairs, into seq's blocks on the writer thread.

        Returns only once the copy is over, even when cancelled meanwhile: the caller frees the
        blocks on its way out, and adds the sequence to the engine only after its last write.
        """
        if not layers:
            return
        done = asyncio.get_running_loop().run_in_executor(self._kv_writer, self._write_layers, seq, layers)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            while not done.done():  # the thread still writes into the blocks
                try:
                    await asyncio.wait([done])
                except asyncio.CancelledError:
                    pass
            raise

    def _write_layers(self, seq: Sequence, layers: list[tuple[int, torch.Tensor]]) -> None:
        for layer, kv in layers:
            self.engine.write_kv(seq, layer, kv)

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return self._channels[address]

    def load_report(self):
        e = self.engine
        if e is None:
            return self.base_report()
        return self.base_report(
            queue_len=len(self._waiting),
            queued_tokens=sum(self._waiting.values()),
            running_seqs=e.slots.used,
            kv_used_tokens=e.kv_used_tokens,
            kv_capacity_tokens=e.kv.capacity_tokens,
            output_tokens_per_s=e.tokens_out.rate(),
            step_ms_p50=e.step_ms.percentile(50),
            step_ms_p95=e.step_ms.percentile(95),
            step_model=e.step_model(),
        )

    async def drain(self, grace_s: float) -> None:
        """Take no new requests; hand running sequences to other decode workers (those that
        cannot move finish here); return when no slot is in use."""
        await self.begin_drain()
        async with self._slot_freed:
            self._slot_freed.notify_all()
        while self.engine.slots.used:
            peers = await self._peers()
            if peers and self.config.migrate_on_drain:
                await self.migrations.migrate_all(peers)
            await asyncio.sleep(0.05)

    async def _peers(self) -> list:
        if self._store is None:
            return []
        try:
            workers = await WorkerDirectory(self._store, self.config.store_prefix).workers(self.stage)
        except Exception as exc:  # store down: finish locally
            raise_if_cancelling(exc)
            log.warning("decode.peers_unavailable", error=str(exc)[:200])
            return []
        return [w for w in workers if w.worker_id != self.config.worker_id and not w.draining]

    async def on_stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        if self.engine is not None:
            self.engine.stop()
        for ch in self._channels.values():
            await ch.close()
        if self.kv_tcp is not None:
            await asyncio.to_thread(self.kv_tcp.stop)  # joins its connection threads
        await asyncio.to_thread(self._kv_writer.shutdown)
        self.shm_pool.close()
        await super().on_stop()


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker):
        self.worker = worker

    async def Generate(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):
        w = self.worker
        cfg = w.runner.config
        try:
            params = sampling_from_proto(request.sampling)
            prompt = list(request.prompt_token_ids)
            check_prompt(prompt, cfg.vocab_size, cfg.max_model_len, params.max_tokens)
        except BadRequest as exc:
            w.metrics.requests.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if w.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is draining; retry on another worker")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        e = w.engine
        if blocks_for_tokens(len(prompt) + 1, e.kv.block_size) + e.watermark_blocks > e.kv.num_blocks:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt_token_ids: {len(prompt)} tokens need more KV than this worker holds "
                f"({e.kv.capacity_tokens - (e.watermark_blocks + 1) * e.kv.block_size} tokens at most)",
            )
        seq = Sequence(
            request.request_id, -1, list(prompt), len(prompt), params, seed, frozenset(cfg.eos_token_ids), e.max_seq_len,
            sampling_offset=request.sampling_offset, outbox=asyncio.Queue(),
        )
        timings = pb.StageTimings()
        start = time.monotonic()
        try:
            await w.reserve(seq, request.deadline_unix_s)
        except Overloaded as exc:
            w.metrics.requests.labels("overloaded").inc()
            context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry in {RETRY_AFTER_MS} ms")
        except asyncio.TimeoutError:
            w.metrics.requests.labels("timeout").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while waiting for KV space")
        timings.decode_queue_ms = (time.monotonic() - start) * 1000
        w.metrics.requests.labels("admitted").inc()
        w.metrics.prompt_tokens.inc(len(prompt))
        w.metrics.queue_wait.observe(timings.decode_queue_ms / 1000)

        added = False
        try:
            # what is left after cached prefix blocks decides: a mostly cached prompt is cheap here
            if request.prefill_address and len(prompt) - seq.num_computed >= w.runtime.local_prefill_threshold:
                # aclosing: if the client goes away mid-transfer, the prefill call and the
                # shared-memory file are released now, not when the generator is collected
                async with aclosing(self._remote_prefill(request, seq, timings)) as firsts:
                    async for first in firsts:
                        yield pb.TokenChunk(token_ids=[first], timings=timings)
                seq.finish_reason = seq.finish_for(seq.tokens[-1]) if seq.generated else None
                if seq.finish_reason:  # e.g. max_tokens 1: the first token was the whole answer
                    yield pb.TokenChunk(finish_reason=seq.finish_reason, timings=timings)
                    return
            else:
                w.kv_sources["local"] += 1  # the engine prefills it in chunks between decode steps
            w.engine.add(seq)
            added = True
            async with aclosing(self._stream(seq, context, timings)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            if not added:
                w.engine.release(seq)

    async def _stream(self, seq: Sequence, context, timings: pb.StageTimings | None = None):
        """Stream a running sequence's tokens; abort it if the client goes away. `timings`
        go with the first chunk when it carries the first token (prefilled here)."""
        w = self.worker
        w.sequences.add(seq)
        start = time.monotonic()
        first = timings is not None and not seq.generated
        try:
            while True:
                token, finish = await seq.outbox.get()
                if first:
                    timings.prefill_compute_ms = (time.monotonic() - start) * 1000
                tokens = [token]
                while not finish and not seq.outbox.empty():  # coalesce what the engine already made
                    token, finish = seq.outbox.get_nowait()
                    tokens.append(token)
                if finish == MIGRATED:
                    address, migration_id = tokens.pop()
                    yield pb.TokenChunk(token_ids=tokens, migrated_to=address, migration_id=migration_id)
                    return
                if finish == "error":
                    seq.finish_reason = FinishReason.ABORT
                    await context.abort(grpc.StatusCode.INTERNAL, "decode step failed; see the worker's log")
                out = [t for t in tokens if t is not None]
                w.metrics.tokens_out.inc(len(out))
                yield pb.TokenChunk(token_ids=out, finish_reason=finish or "", timings=timings if first else None)
                first = False
                if finish:
                    return
        finally:
            w.sequences.discard(seq)
            if not seq.finish_reason:
                w.engine.abort(seq)  # the engine releases the slot at its next step

    async def Adopt(self, request_iterator, context: grpc.aio.ServicerContext):
        if self.worker.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is draining")
        try:
            migration_id = await self.worker.migrations.adopt(aiter(request_iterator))
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OverflowError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; try another worker")
        return pb.AdoptResponse(migration_id=migration_id)

    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext):
        seq = self.worker.migrations.take(request.migration_id)
        if seq is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no adopted sequence {request.migration_id!r} (expired?)")
        async with aclosing(self._stream(seq, context)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _remote_prefill(self, request, seq: Sequence, timings):
        """Yield the first token as soon as it arrives (appended to seq.tokens), then write the
        KV into the sequence's blocks.

        If the prefill worker fails, the engine computes the prompt (and the first token too
        if it has not arrived) here instead; the KV is the same, so the request goes on unchanged.
        """
        w = self.worker
        cfg = w.runner.config
        prompt = seq.tokens[: seq.prompt_len]
        size = cfg.kv_bytes_per_token(w.engine.cache.k[0].element_size()) * len(prompt)
        buffers = {}  # transport -> the buffer offered for it (this worker owns and frees them)
        inbox = None  # the tcp path's buffer and connection state
        call = None
        if w.config.kv_transport == "auto" and request.prefill_host_id == host_id():
            buffers[SHM] = w.shm_pool.take(size, tag=str(seq.slot))
            if w.engine.cache.device.type == "cuda":
                buffers[CUDA_IPC] = DeviceBuffer.allocate(size, w.engine.cache.device)
        elif w.kv_tcp is not None:  # another host (or tcp forced): a socket, one-time token
            inbox = w.kv_tcp.expect(size, (2, cfg.num_kv_heads, len(prompt), cfg.head_dim), cfg.num_layers)
        try:
            prefill = prefill_method(w.channel(request.prefill_address))  # KV bytes arrive without copies
            shm = buffers.get(SHM)
            target = pb.KvTarget(host_id=host_id(), shm_path=str(shm.path) if shm else "", shm_bytes=shm.size if shm else 0)
            if CUDA_IPC in buffers:
                target.cuda_ipc.CopyFrom(buffers[CUDA_IPC].export())
            if inbox is not None:
                target.tcp_address, target.tcp_token = w.kv_tcp_address, inbox.token
            sampling = sampling_to_proto(seq.params)
            sampling.seed = seq.seed  # the prefill worker draws token 0 from the same stream
            call = prefill(pb.PrefillRequest(
                request_id=request.request_id, prompt_token_ids=prompt, sampling=sampling, kv_target=target,
                sampling_offset=seq.sampling_offset,
            ), metadata=outgoing_metadata(request.request_id))
            receiver = None
            kv_start = None
            first = None
            expected = (2, cfg.num_kv_heads, len(prompt), cfg.head_dim)
            async for msg in _paced(call, w.config.prefill_stall_timeout_s):  # head, KV chunks, first token
                kind = "kv" if isinstance(msg, KvChunkData) else msg.WhichOneof("kind")
                if kind == "head":
                    layout = KvLayout.from_proto(msg.head.layout)
                    if layout.layer_shape != expected or layout.num_layers != cfg.num_layers:
                        raise ValueError(f"prefill sent KV {layout}, this model needs {expected} x {cfg.num_layers}")
                    timings.prefill_queue_ms = msg.head.queue_ms
                    offered = inbox if msg.head.transport == TCP else buffers.get(msg.head.transport)
                    receiver = KvReceiver(layout, msg.head.transport, offered)
                    kv_start = time.monotonic()
                elif kind == "first":
                    timings.prefill_compute_ms = msg.first.compute_ms
                    first = msg.first.token_id
                    seq.tokens.append(first)
                    yield first
                elif receiver is None:
                    raise ConnectionError("prefill sent KV before its head")
                else:
                    chunk = msg if isinstance(msg, KvChunkData) else msg.kv
                    if receiver.transport == TCP:  # the gRPC stream says sent; wait until it is here
                        await inbox.until(chunk.layer_end, w.config.kv_tcp_timeout_s)
                        if inbox.layout != receiver.layout:
                            raise ValueError(f"prefill sent KV {inbox.layout} over tcp, {receiver.layout} in its head")
                    await w.write_kv(seq, list(receiver.layers(chunk)))
            if receiver is None or not receiver.complete or first is None:
                raise ConnectionError("prefill stream ended before the whole KV and the first token arrived")
            w.engine.kv_written(seq, len(prompt))
            timings.kv_transfer_ms = (time.monotonic() - kv_start) * 1000
            w.metrics.kv_transfer.observe(timings.kv_transfer_ms / 1000)
            w.kv_sources[receiver.transport] += 1
            if SHM in buffers:  # complete: no prefill writer can touch the file any more
                w.shm_pool.give_back(buffers.pop(SHM))
        except (grpc.aio.AioRpcError, ConnectionError, ValueError, TimeoutError) as exc:
            # blocks written so far are overwritten by the recompute (num_computed is unchanged)
            log.warning("decode.prefill_fallback", request_id=request.request_id, error=repr(exc)[:200])
            w.kv_sources["local"] += 1
        finally:
            if call is not None:
                call.cancel()  # a stalled or failed call must not keep the prefill worker busy
            for buffer in buffers.values():
                buffer.unlink()
            if inbox is not None:
                inbox.close()  # complete: its buffer is pooled; else dropped and the connection reset


async def _paced(call, stall_s: float):
    """The call's messages; TimeoutError if none comes for stall_s (a prefill worker that froze
    or lost the request must not hold the decode side's request forever)."""
    messages = aiter(call)
    while True:
        try:
            async with asyncio.timeout(stall_s):  # a timer on this task, not a task per message
                msg = await anext(messages)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise TimeoutError(f"the prefill worker sent nothing for {stall_s:g} s") from None
        yield msg


async def main(config: DecodeConfig) -> None:
    from ..common.server import run_until_signal

    await run_until_signal(DecodeWorker(config), config.drain_grace_s)
