"""Handing running sequences from a draining decode worker to another one.

Out (drain): detach the sequence from the batch at a step boundary, stream its tokens,
sampling state and KV (positions before the last token) to a peer's `Decode.Adopt`, then
end the client's stream with `migrated_to` + `migration_id`; the gateway continues with
`Decode.Resume` on the peer. If the hand-over fails the sequence rejoins the local batch.
In (adopt): reserve a seat and KV blocks, write the KV, start decoding at once (tokens wait in the
sequence's outbox) and park it until `Resume` collects it or `adopt_timeout_s` passes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import structlog

from ..common.convert import BadRequest, check_prompt, sampling_from_proto, sampling_to_proto
from ..common.kv_transport import GRPC, KvLayout, KvReceiver, layout_of, send_chunks
from ..common.load_report import LoadReport
from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from .sequence import Sequence

if TYPE_CHECKING:
    from .server import DecodeWorker

log = structlog.get_logger(__name__)

MIGRATED = "migrated"  # outbox finish marker: the token slot carries (address, migration_id)
DETACH_TIMEOUT_S = 5.0


class Migrations:
    def __init__(self, worker: "DecodeWorker", adopt_timeout_s: float = 30.0):
        self.worker = worker
        self.adopt_timeout_s = adopt_timeout_s
        self.parked: dict[str, tuple[Sequence, float]] = {}  # migration id -> (sequence, adopted at)
        self.sent = 0
        self.adopted = 0

    # ---- out ----

    async def migrate_all(self, targets: list[LoadReport]) -> None:
        """Hand every running sequence to the least-loaded peers, round robin."""
        if not targets:
            return
        targets = sorted(targets, key=lambda t: (t.queued_tokens, -t.kv_free_tokens))
        # a sequence still computing its prompt (or recomputing after a preemption) has no
        # complete KV to send yet; the drain loop comes back for it
        seqs = [s for s in list(self.worker.sequences) if not s.finish_reason and s.num_computed >= len(s.tokens) - 1]
        await asyncio.gather(*(self.migrate(s, targets[i % len(targets)]) for i, s in enumerate(seqs)))

    async def migrate(self, seq: Sequence, target: LoadReport) -> bool:
        engine = self.worker.engine
        waiter = engine.detach(seq)
        try:
            detached = await asyncio.wait_for(waiter, DETACH_TIMEOUT_S)
        except asyncio.TimeoutError:  # it finished before the request reached the engine
            detached = False
        seq.detach_requested = False
        if not detached:
            return False
        try:
            stub = pb_grpc.DecodeStub(self.worker.channel(target.address))
            reply = await stub.Adopt(self._adopt_messages(seq), timeout=30)
        except grpc.aio.AioRpcError as exc:
            log.warning("decode.migrate_failed", request_id=seq.request_id, target=target.address, error=exc.details())
            engine.add(seq)  # carry on here; the drain waits for it
            return False
        engine.release(seq)
        seq.finish_reason = MIGRATED
        seq.outbox.put_nowait(((target.address, reply.migration_id), MIGRATED))
        self.sent += 1
        log.info("decode.migrated", request_id=seq.request_id, target=target.address, tokens=len(seq.tokens))
        return True

    async def _adopt_messages(self, seq: Sequence) -> AsyncIterator[pb.AdoptChunk]:
        n = seq.position  # KV exists for positions [0, n); tokens[n] is fed at the next step
        layers = self.worker.engine.read_kv(seq, n)
        sampling = sampling_to_proto(seq.params)
        sampling.seed = seq.seed
        yield pb.AdoptChunk(head=pb.AdoptHead(
            request_id=seq.request_id, token_ids=seq.tokens, prompt_len=seq.prompt_len, sampling=sampling,
            sampling_offset=seq.sampling_offset, layout=layout_of(layers).to_proto(),
        ))
        _, chunks = send_chunks(layers, None)
        for chunk in chunks:
            yield pb.AdoptChunk(kv=chunk)

    # ---- in ----

    async def adopt(self, messages: AsyncIterator[pb.AdoptChunk]) -> str:
        """Take a sequence from a peer; returns its migration id. Raises BadRequest."""
        w = self.worker
        head = (await anext(messages)).head
        tokens = list(head.token_ids)
        if not head.prompt_len or head.prompt_len >= len(tokens):
            raise BadRequest("adopt: prompt_len must be > 0 and below the number of tokens")
        check_prompt(tokens, w.runner.config.vocab_size, w.runner.config.max_model_len)
        params = sampling_from_proto(head.sampling)
        layout = KvLayout.from_proto(head.layout)
        if layout.num_layers != w.runner.config.num_layers or layout.layer_shape[2] != len(tokens) - 1:
            raise BadRequest("adopt: the KV layout does not match this model and these tokens")
        seq = Sequence(
            head.request_id, -1, tokens, head.prompt_len, params, head.sampling.seed,
            frozenset(w.runner.config.eos_token_ids), w.engine.max_seq_len,
            sampling_offset=head.sampling_offset, outbox=asyncio.Queue(),
        )
        if w.engine.slots.used >= w.runtime.max_concurrency or not w.engine.reserve(seq, len(tokens)):
            raise OverflowError("no free KV seat or blocks")
        try:
            receiver = KvReceiver(layout, GRPC, None)
            async for msg in messages:
                await w.write_kv(seq, list(receiver.layers(msg.kv)))  # off the event loop
            if not receiver.complete:
                raise BadRequest("adopt: the stream ended before the whole KV arrived")
        except BaseException:
            w.engine.release(seq)
            raise
        w.engine.kv_written(seq, len(tokens) - 1)
        migration_id = uuid.uuid4().hex
        self.parked[migration_id] = (seq, time.monotonic())
        w.engine.add(seq)
        self.adopted += 1
        return migration_id

    def take(self, migration_id: str) -> Sequence | None:
        entry = self.parked.pop(migration_id, None)
        return None if entry is None else entry[0]

    def expire(self) -> None:
        """Abort adopted sequences nobody resumed in time (their gateway went away)."""
        now = time.monotonic()
        for mid, (seq, since) in list(self.parked.items()):
            if now - since > self.adopt_timeout_s:
                del self.parked[mid]
                if not seq.finish_reason:
                    self.worker.engine.abort(seq)
