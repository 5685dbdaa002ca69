"""The worker side of disaggregated experts: `RemoteExperts`, the MoE blocks' expert backend.

The model thread calls `forward(layer, x, expert_ids, weights)` once per MoE layer per step. It
splits the step's (token, expert) pairs by expert group (services/experts/placement.py), sends
one Experts.Forward per group to that group's least-loaded replica over a synchronous gRPC
channel (no event-loop hop in the hot path; the calls to different groups run concurrently),
and adds the weighted partial sums back per token. A group with several replicas and at least
`min_pairs_per_split` pairs per replica gets its pairs split across them, so one caller's step
keeps every replica of a hot group busy instead of relying on many callers to spread out.

What the model thread reads, the placement and the live replicas, is an immutable `View` that an
asyncio task on the worker's event loop rebuilds from the store every `refresh_s` and swaps in
whole: a placement update takes effect at the next layer call, never in the middle of one.

A call that fails with UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED (a replica going away) is
sent again to another replica of the group, else to any live experts server (any server can
compute any expert: it loads weights on first use). Only when every try fails does the step fail.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
import structlog
import torch

from ..common.config import from_env
from ..common.registry import WorkerDirectory
from ..common.server import GRPC_OPTIONS
from ..common.store import connect
from ..common.tasks import raise_if_cancelling, spawn, stop_task
from ..engine.moe_model import pairs
from ..proto import experts_pb2_grpc as pb_grpc
from .config import ExpertsClientConfig
from .placement import Placement, Replica, least_loaded, split_tokens, stage_of
from .placement_store import read_placement
from .wire import from_bytes, request

log = structlog.get_logger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
FAILED_COOLDOWN_S = 5.0  # a replica whose call failed is avoided this long


class ExpertsUnavailable(RuntimeError):
    """No experts server answered; the step's sequences fail with this message."""


@dataclass(frozen=True)
class View:
    placement: Placement
    replicas: dict[str, tuple[Replica, ...]]  # group -> live, non-draining replicas
    fallback: tuple[Replica, ...] = ()  # every non-draining replica of any group
    draining: tuple[Replica, ...] = ()  # still answering while they drain: the last resort

    def ready(self) -> bool:
        return all(self.replicas.get(g) for g in self.placement.groups)


@dataclass
class _Call:
    group: str
    rows: torch.Tensor  # [n] rows of x this call carries
    request: object
    tried: set = field(default_factory=set)
    replica: Replica | None = None
    future: object = None
    sent_at: float = 0.0


class RemoteExperts:
    def __init__(self, config: ExpertsClientConfig):
        self.config = config
        self.view: View | None = None
        self._store = connect(config.store_url)
        self._directory = WorkerDirectory(self._store, config.store_prefix)
        self._stubs: dict[str, pb_grpc.ExpertsStub] = {}
        self._channels: list[grpc.Channel] = []
        self._sent: dict[str, float] = defaultdict(float)  # tokens sent per replica since the last refresh
        self._failed: dict[str, float] = {}  # worker id -> when a call to it last failed (it may linger in the store)
        self._task: asyncio.Task | None = None
        self.calls = 0
        self.retries = 0
        self.transport_ms = 0.0  # summed over calls: wall time minus the server's expert compute

    # ---- event loop side ----

    async def start(self) -> None:
        await self.refresh()
        self._task = spawn(self._refresh_forever(), name="experts.client.refresh")

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.view is None or not self.view.ready():
            if time.monotonic() > deadline:
                raise ExpertsUnavailable(f"no experts server for every group within {timeout_s:.0f} s "
                                         f"(placement: {self.view.placement.to_json() if self.view else 'none'})")
            await asyncio.sleep(0.1)
            await self.refresh()

    async def refresh(self) -> None:
        placement = await read_placement(self._store, self.config.store_prefix)
        if placement is None:
            return
        replicas, draining = {}, []
        for group in sorted(placement.groups):
            reports = await self._directory.workers(stage_of(group))
            replicas[group] = tuple(_replica(r) for r in reports if not r.draining)
            draining += [_replica(r) for r in reports if r.draining]
        fallback = tuple(r for group in sorted(replicas) for r in replicas[group])
        self.view = View(placement, replicas, fallback, tuple(draining))
        self._sent = defaultdict(float)  # the new reports include what was sent before them

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # store down: keep routing on the last view
                raise_if_cancelling(exc)
                log.warning("experts.client.refresh_failed", error=str(exc))

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        for channel in self._channels:
            channel.close()
        await self._store.aclose()

    # ---- model thread side ----

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids / weights [N, K] -> the weighted expert sum per token [N, H]."""
        view = self.view
        if view is None:
            raise ExpertsUnavailable("no expert placement in the store yet; is an experts server running?")
        token_index, experts, w = pairs(expert_ids, weights)  # [P] each
        calls = self._plan(view, layer, x, token_index, experts, w)
        for call in calls:
            self._send(view, call)
        out = torch.zeros_like(x)
        for call in calls:
            reply = self._wait(view, call)
            partial = from_bytes(reply.hidden, x.dtype, call.rows.shape[0], x.shape[1]).to(x.device)
            out.index_add_(0, call.rows, partial)
        return out

    def _plan(self, view: View, layer: int, x, token_index, experts, w) -> list[_Call]:
        """One call per group: the pairs its experts get, over the distinct token rows they need."""
        order = torch.argsort(experts, stable=True)  # pairs grouped by expert
        counts = torch.bincount(experts, minlength=view.placement.num_experts).tolist()
        plan = split_tokens({e: n for e, n in enumerate(counts) if n}, view.placement)
        by_group: dict[str, list[torch.Tensor]] = defaultdict(list)
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            mine = order[start : start + n]
            start += n
            taken = 0
            for group, share in plan[e].items():
                by_group[group].append(mine[taken : taken + share])
                taken += share
        calls = []
        x_host = x.detach().cpu() if x.device.type != "cpu" else x
        for group in sorted(by_group):
            idx = torch.cat(by_group[group])  # pair indices of this group, by expert
            parts = min(len(view.replicas.get(group, ())), idx.numel() // self.config.min_pairs_per_split)
            for part in idx.tensor_split(max(parts, 1)):  # contiguous: each part has few experts
                rows, local = torch.unique(token_index[part], return_inverse=True)
                req = request(layer, x_host[rows.cpu()], local, experts[part], w[part])
                calls.append(_Call(group, rows, req))
        return calls

    def _send(self, view: View, call: _Call) -> None:
        now = time.monotonic()
        candidates = []
        # this group's replicas, then any experts server (each can compute any expert), then
        # draining ones; servers that just failed a call only when nothing else is left
        for pool in (view.replicas.get(call.group, ()), view.fallback, view.draining):
            fresh = [r for r in pool if r.worker_id not in call.tried]
            healthy = [r for r in fresh if now - self._failed.get(r.worker_id, -1e9) > FAILED_COOLDOWN_S]
            candidates = healthy or candidates or fresh
            if healthy:
                break
        if not candidates:
            raise ExpertsUnavailable(
                f"no experts server left for group {call.group} (tried {len(call.tried)}); "
                "the step fails, retry the request"
            )
        call.replica = least_loaded(candidates, self._sent)
        call.tried.add(call.replica.worker_id)
        self._sent[call.replica.worker_id] += len(call.request.expert_ids)
        self.calls += 1
        call.sent_at = time.perf_counter()
        call.future = self._stub(call.replica.address).Forward.future(call.request, timeout=self.config.call_timeout_s)

    def _wait(self, view: View, call: _Call):
        while True:
            try:
                reply = call.future.result()
                self.transport_ms += (time.perf_counter() - call.sent_at) * 1000 - reply.compute_ms
                return reply
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or len(call.tried) > self.config.max_retries:
                    raise ExpertsUnavailable(
                        f"experts group {call.group} at {call.replica.address}: {exc.code().name}: {exc.details()}"
                    ) from exc
                log.warning("experts.client.retry", group=call.group, address=call.replica.address, code=exc.code().name)
                self._failed[call.replica.worker_id] = time.monotonic()
                self.retries += 1
                self._send(self.view or view, call)

    def _stub(self, address: str) -> pb_grpc.ExpertsStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.ExpertsStub(channel)
        return stub


def _replica(report) -> Replica:
    return Replica(report.worker_id, report.address, report.queued_tokens, report.prompt_tokens_per_s)


async def attach_remote_experts(model, store_url: str, store_prefix: str) -> RemoteExperts:
    """Point an MoE model's blocks (or a dense model's synthetic expert load) at the experts service."""
    config = from_env(ExpertsClientConfig, store_url=store_url, store_prefix=store_prefix)
    if not config.store_url:
        raise ValueError("experts=remote needs the shared store (store_url / REDIS_URL) to find experts servers")
    remote = RemoteExperts(config)
    await remote.start()
    await remote.wait_ready(config.ready_timeout_s)
    if hasattr(model, "use_experts"):
        model.use_experts(remote)
    else:
        from .synthetic import add_synthetic_load

        add_synthetic_load(model, remote, config)
    log.info("experts.client.attached", placement_version=remote.view.placement.version)
    return remote
