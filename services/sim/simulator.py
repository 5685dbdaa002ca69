"""Discrete-event simulation of the elastune pipeline on a cluster of GPUs. Pure: no I/O, no torch.

The clock is simulated; events are kept in a heap (time, sequence number, kind, pod, version),
and a pod's stale events are skipped by version. Request flow, as in the real stack:
arrival at the gateway -> a decode pod with room reserves KV (prompt + max output) -> a prefill
pod's queue -> micro-batch -> first token (+ KV hand-off) -> the decode pod's continuous batch,
joining at the next step boundary -> one token per step until its output length. Requests
wait at the gateway (FIFO) while no decode pod has room, and are never dropped. Pods: placed on
GPUs by share, ready after the profile's cold start, drained on scale-down (they stop taking
work, finish what they hold, then free their GPU share), newest first. The profile's stack block
adds a per-request delay before the first token and a per-step overhead, and with a shared host
(a local stack) slows CPU work by the host's contention (services/sim/profile.py).

Every `interval_s` each stage's controller (services/sim/control.py) sees StageSignals built from
the simulated load reports and sets the stage's replicas.

MoE (SimConfig.moe): every decode step and prefill micro-batch also waits on its expert groups,
and each group (stage `experts/<group>`, plan "experts") is scaled like the other stages on its
routed pairs/s (services/sim/moe.py). Expert pods hold no requests: on scale-down they go at once.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from services.common.load_report import LoadReport
from services.scaler.signals import StageSignals

from .cluster import Cluster
from .control import StageControl, StageController
from .moe import ExpertsStage, MoeSpec
from .pods import DRAINING, GONE, READY, STARTING, DecodePod, Pod, PrefillPod
from .profile import Profile
from .result import RunData, ScaleChange, StageSample
from .tuning import StagePlan, TuningTable, retune
from .window import Window

STAGES = ("prefill", "decode")
_PREFILL_DONE, _DECODE, _POD_READY, _CONTROL = 0, 1, 2, 3


@dataclass(frozen=True)
class SimConfig:
    profile: Profile
    controls: dict[str, StageControl]  # per stage
    plans: dict[str, StagePlan]  # per stage: share, runtime config, capacity
    gpus: int = 16
    interval_s: float = 15.0  # KEDA polling interval = scaler decision interval
    window_s: float = 5.0  # load reports' rate and latency window
    slo_ttft_s: float = 2.0  # for the deadline slack signal
    drain_limit_s: float = 1800.0  # after the last arrival, unfinished requests time out
    table: TuningTable | None = None  # with it, pods re-pick their config every interval
    retune_slo_ms: dict[str, float] | None = None
    seed: int = 0
    moe: MoeSpec | None = None  # with it: controls for every experts/<group> stage, plans["experts"]


class Simulator:
    def __init__(self, config: SimConfig, arrivals: Sequence[float], prompts: Sequence[int], outputs: Sequence[int]):
        self.c = config
        self.rng = random.Random(config.seed)
        self.arrival, self.prompt, self.output = list(arrivals), list(prompts), list(outputs)
        n = len(self.arrival)
        if any(b < a for a, b in zip(self.arrival, self.arrival[1:])):
            raise ValueError("arrivals must be sorted")
        self.kv_need = [p + o for p, o in zip(self.prompt, self.output)]
        self.first = [math.nan] * n
        self.finish = [math.nan] * n
        self.started = [math.nan] * n  # prefill began
        self.decode_of: list[DecodePod | None] = [None] * n
        self.join_step = [0] * n
        self.cluster = Cluster(config.gpus)
        self.heap: list = []
        self.seq = 0
        self.stages = STAGES + (config.moe.stages() if config.moe else ())
        self.pods: dict[str, list[Pod]] = {s: [] for s in self.stages}
        self.accepting: dict[str, list[Pod]] = {s: [] for s in self.stages}
        self.controllers = {s: StageController(config.controls[s]) for s in self.stages}
        self.experts: ExpertsStage | None = None
        if config.moe:
            plan = config.plans["experts"]
            model = config.profile.experts_model()
            self.experts = ExpertsStage(config.moe, model, plan.share,
                                        plan.config.get("max_batch_size", model.max_batch_size),
                                        config.window_s, self.accepting)
        self.waiting: deque[int] = deque()  # at the gateway: no decode room yet
        self.prefill_wait: deque[int] = deque()  # admitted, no prefill pod yet
        self.waiting_prompt = 0  # prompt tokens of requests whose prefill has not started
        self.waiting_output = 0  # max output tokens of requests not admitted to decode yet
        self.unfinished = n
        self.prompt_in, self.tokens_out = Window(config.window_s), Window(config.window_s)
        self.ttfts, self.gaps = Window(config.window_s), Window(config.window_s)
        self.data = RunData()
        self.next_id = 0
        self.events = 0
        stack = config.profile.stack
        self.stack, self.shared_host = stack, stack.shared_host
        self.request_overhead_s = stack.request_overhead_ms / 1000.0
        self.decode_model = config.profile.decode
        if stack.step_overhead_ms:
            self.decode_model = replace(self.decode_model, overhead_ms=self.decode_model.overhead_ms + stack.step_overhead_ms)
        self.requests_in = Window(config.window_s)  # fed only with a shared host (its background load)

    # ------------------------------------------------------------------ driver

    def run(self) -> RunData:
        wall = time.perf_counter()
        for stage in self.stages:
            for _ in range(self.c.controls[stage].replicas):
                self._add_pod(stage, 0.0, warm=True)
        self._push(0.0, _CONTROL, None)
        i, n, now = 0, len(self.arrival), 0.0
        end = (self.arrival[-1] if n else 0.0) + self.c.drain_limit_s
        heap, arrival = self.heap, self.arrival
        while True:
            t_arr = arrival[i] if i < n else math.inf
            if heap and heap[0][0] < t_arr:
                now, _, kind, pod, version = heapq.heappop(heap)
                if now > end:
                    break
                self.events += 1
                if kind == _DECODE:
                    if pod.version == version:
                        self._on_decode(pod, now)
                elif kind == _PREFILL_DONE:
                    self._on_prefill_done(pod, now)
                elif kind == _POD_READY:
                    if pod.version == version:
                        self._on_ready(pod, now)
                elif not self._on_control(now, i < n):
                    break
            elif i < n:
                now = t_arr
                self._on_arrival(i, now)
                i += 1
            else:
                break
        self.cluster.account(now)
        return self._result(now, time.perf_counter() - wall)

    def _push(self, t: float, kind: int, pod: Pod | None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, pod, pod.version if pod else 0))

    # ------------------------------------------------------------------ requests

    def _slowdown(self, pod: Pod, now: float) -> float:
        """The host's contention factor for `pod`, which is busy from now (1 without a shared host)."""
        if not self.shared_host:
            return 1.0
        busy, starting = pod.share, self.stack.starting_cpu
        for p in self.pods["prefill"]:
            if p is not pod and p.running:
                busy += p.share
            elif starting and p.state == STARTING and p.gpu is not None:
                busy += starting * p.share
        for p in self.pods["decode"]:
            if p is not pod and p.finishing:
                busy += p.share
            elif starting and p.state == STARTING and p.gpu is not None:
                busy += starting * p.share
        background = self.stack.background(self.requests_in.rate(now), self.tokens_out.rate(now))
        return self.stack.slowdown(busy, background)

    def _on_arrival(self, rid: int, now: float) -> None:
        if self.shared_host:
            self.requests_in.add(now, 1.0)
        self.prompt_in.add(now, self.prompt[rid])
        self.waiting.append(rid)
        self.waiting_prompt += self.prompt[rid]
        self.waiting_output += self.output[rid]
        self._admit(now)

    def _pick_decode(self, kv: int) -> DecodePod | None:
        pods = self.accepting["decode"]
        if not pods:
            return None
        rnd, n = self.rng.random, len(pods)
        a, b = pods[int(rnd() * n)], pods[int(rnd() * n)]  # power of two choices, as the gateway
        for pod in sorted((a, b), key=lambda p: p.admitted):
            if pod.has_room(kv):
                return pod
        room = [p for p in pods if p.has_room(kv)]
        return min(room, key=lambda p: p.admitted) if room else None

    def _admit(self, now: float) -> None:
        while self.waiting:
            rid = self.waiting[0]
            pod = self._pick_decode(self.kv_need[rid])
            if pod is None:
                return
            self.waiting.popleft()
            self.waiting_output -= self.output[rid]
            pod.admit(self.kv_need[rid])
            self.decode_of[rid] = pod
            self._to_prefill(rid, now)

    def _to_prefill(self, rid: int, now: float) -> None:
        pods = self.accepting["prefill"]
        if not pods:
            self.prefill_wait.append(rid)
            return
        rnd, n = self.rng.random, len(pods)
        a, b = pods[int(rnd() * n)], pods[int(rnd() * n)]
        pod = a if a.queued_tokens <= b.queued_tokens else b
        pod.queue.append(rid)
        pod.queued_tokens += self.prompt[rid]
        self._start_prefill(pod, now)

    def _start_prefill(self, pod: PrefillPod, now: float) -> None:
        slow = self._slowdown(pod, now) if self.shared_host and pod.queue and not pod.running else 1.0
        if self.experts is None:
            end = pod.start_batch(now, self.prompt, slow)
        else:
            end = pod.start_batch(now, self.prompt, slow, lambda tokens: self._experts_wait(tokens, now))
        if end is not None:
            for rid in pod.running:
                self.started[rid] = now
                self.waiting_prompt -= self.prompt[rid]
            self._push(end, _PREFILL_DONE, pod)

    def _experts_wait(self, tokens: int, now: float) -> float:
        """A prefill micro-batch's wait on the expert groups; its routed pairs reach them now."""
        self.experts.callers += 1  # until the batch is done
        wait = self.experts.delay_s(tokens, now)
        self.experts.account(tokens, 1, now)
        return wait

    def _on_prefill_done(self, pod: PrefillPod, now: float) -> None:
        per_token, extra = self.c.profile.kv_transfer_ms_per_token / 1000.0, self.request_overhead_s
        done = pod.finish_batch()
        if self.experts is not None and done:
            self.experts.callers -= 1
        if self.shared_host and done:  # the hand-off and the stack's hops are CPU work on the host too
            slow = self._slowdown(pod, now)
            per_token, extra = per_token * slow, extra * slow
        for rid in done:
            ready = now + per_token * self.prompt[rid] + extra
            self.first[rid] = ready
            self.ttfts.add(ready, ready - self.arrival[rid])
            dpod = self.decode_of[rid]
            if self.output[rid] <= 1:  # the first token was the whole answer
                self._done(rid, dpod, ready)
                continue
            heapq.heappush(dpod.joins, (ready, rid))
            self._reschedule(dpod)
        self._start_prefill(pod, now)
        if pod.state == DRAINING and pod.idle():
            self._remove(pod, now)

    def _reschedule(self, pod: DecodePod) -> None:
        t = pod.next_event()
        if t != pod.scheduled:
            pod.version += 1
            pod.scheduled = t
            if t < math.inf:
                self._push(t, _DECODE, pod)

    def _on_decode(self, pod: DecodePod, now: float) -> None:
        batch = pod.batch
        steps, dt = pod.advance(now)
        if steps:
            self.gaps.add(now, dt, steps * batch)
            self.data.itl_values.append(dt)
            self.data.itl_weights.append(steps * batch)
            self.tokens_out.add(now, steps * batch)
            if self.experts is not None:
                self.experts.account(batch, steps, now)
        for rid in pod.pop_finished():
            pod.leave(self.prompt[rid], self.join_step[rid])
            self._done(rid, pod, now)
        joined = []
        while pod.joins and pod.joins[0][0] <= now + 1e-12:
            rid = heapq.heappop(pod.joins)[1]
            self.join_step[rid] = pod.steps
            pod.join(rid, self.prompt[rid], self.output[rid] - 1)
            joined.append(rid)
        slow = self._slowdown(pod, now) if self.shared_host and pod.finishing else 1.0
        if self.experts is None:
            pod.retime(slow)
        else:
            self.experts.callers += (pod.batch > 0) - (batch > 0)  # the pod started or stopped stepping
            pod.retime(slow, self.experts.delay_s(pod.batch, now))
        for rid in joined:  # the first decode token comes one step after joining
            self.data.itl_values.append(now + pod.dt - self.first[rid])
            self.data.itl_weights.append(1)
        pod.scheduled = None
        self._reschedule(pod)

    def _done(self, rid: int, pod: DecodePod, now: float) -> None:
        self.finish[rid] = now
        self.unfinished -= 1
        pod.release(self.kv_need[rid])
        self._admit(now)
        if pod.state == DRAINING and pod.admitted == 0:
            self._remove(pod, now)

    # ------------------------------------------------------------------ pods

    def _add_pod(self, stage: str, now: float, warm: bool = False) -> Pod:
        plan, profile = self.c.plans.get(stage), self.c.profile
        self.next_id += 1
        if stage == "prefill":
            pod: Pod = PrefillPod(self.next_id, stage, plan.share, now, model=profile.prefill,
                                  max_batch_tokens=plan.config.get("max_batch_tokens", profile.prefill.max_batch_tokens),
                                  max_batch_size=profile.prefill.max_batch_size)
        elif stage == "decode":
            pod = DecodePod(self.next_id, stage, plan.share, now, model=self.decode_model,
                            max_batch_size=plan.config.get("max_batch_size", profile.decode.max_batch_size),
                            kv_capacity=profile.decode.kv_capacity(plan.share))
        else:
            pod = Pod(self.next_id, stage, self.c.plans["experts"].share, now)
        self.pods[stage].append(pod)
        if self.cluster.place(pod, now):
            self._placed(pod, now, warm)
        return pod

    def _placed(self, pod: Pod, now: float, warm: bool = False) -> None:
        pod.ready_at = now if warm else now + self.c.profile.cold_start(pod.stage.split("/")[0])
        if warm:
            self._on_ready(pod, now)
        else:
            self._push(pod.ready_at, _POD_READY, pod)

    def _on_ready(self, pod: Pod, now: float) -> None:
        pod.state = READY
        self.accepting[pod.stage].append(pod)
        if pod.stage == "decode":
            self._admit(now)
        elif pod.stage == "prefill":
            while self.prefill_wait:
                self._to_prefill(self.prefill_wait.popleft(), now)

    def _remove(self, pod: Pod, now: float) -> None:
        pod.state, pod.gone_at = GONE, now
        pod.version += 1
        self.pods[pod.stage].remove(pod)
        for placed in self.cluster.remove(pod, now):
            self._placed(placed, now)

    def _scale(self, stage: str, target: int, now: float) -> None:
        live = [p for p in self.pods[stage] if p.state in (STARTING, READY)]
        for _ in range(target - len(live)):
            self._add_pod(stage, now)
        # Newest first: pods not placed, then cold-starting ones (nothing to lose), then ready ones drain.
        order = sorted(live, key=lambda p: (p.gpu is not None, p.state == READY, -p.pod_id))
        for pod in order[: max(len(live) - target, 0)]:
            if pod.state == STARTING:
                self._remove(pod, now)
                continue
            pod.state = DRAINING
            self.accepting[stage].remove(pod)
            if isinstance(pod, PrefillPod):
                busy = not pod.idle()
            else:  # an expert pod's calls take milliseconds: callers move on at once
                busy = isinstance(pod, DecodePod) and pod.admitted > 0
            if not busy:
                self._remove(pod, now)

    # ------------------------------------------------------------------ control

    def _on_control(self, now: float, arrivals_left: bool) -> bool:
        if not arrivals_left and self.unfinished == 0:
            return False
        for stage in self.stages:
            signals, active = self._signals(stage, now)
            live = [p for p in self.pods[stage] if p.state in (STARTING, READY)]
            target = self.controllers[stage].target(signals, active, len(live))
            if target != len(live):
                self.data.changes.append(ScaleChange(now, stage, len(live), target))
                self._scale(stage, target, now)
            if self.c.table is not None and signals.ready_replicas and stage in STAGES:
                self._retune(stage, signals, now)
            self._sample(stage, now, target, signals)
        self._push(now + self.c.interval_s, _CONTROL, None)
        return True

    def _retune(self, stage: str, signals: StageSignals, now: float) -> None:
        plan = self.c.plans[stage]
        rate = signals.prompt_tokens_per_s if stage == "prefill" else signals.output_tokens_per_s
        slo = (self.c.retune_slo_ms or {}).get(stage)
        if slo is None:
            return
        for pod in self.accepting[stage]:
            key = "max_batch_tokens" if stage == "prefill" else "max_batch_size"
            current = {key: getattr(pod, key)}
            config = retune(self.c.table, self.c.profile, plan, rate / signals.ready_replicas, slo, current)
            setattr(pod, key, config.get(key, getattr(pod, key)))

    def _signals(self, stage: str, now: float) -> tuple[StageSignals, bool]:
        pods = self.pods[stage]
        ready = [p for p in pods if p.state == READY]
        pending = sum(1 for p in pods if p.state == STARTING)
        heads = [self.arrival[self.waiting[0]]] if self.waiting else []
        if self.prefill_wait:
            heads.append(self.arrival[self.prefill_wait[0]])
        heads += [self.arrival[p.queue[0]] for p in self.pods["prefill"] if isinstance(p, PrefillPod) and p.queue]
        slack = min(heads) + self.c.slo_ttft_s - now if heads else math.inf
        ttft_p95, itl_p95 = self.ttfts.quantile(now, 0.95), self.gaps.quantile(now, 0.95)
        common = dict(now=now, ready_replicas=len(ready), pending_replicas=pending,
                      prompt_tokens_per_s=self.prompt_in.rate(now), output_tokens_per_s=self.tokens_out.rate(now),
                      oldest_deadline_slack_s=slack, ttft_p95_s=ttft_p95, itl_p95_s=itl_p95)
        if stage not in STAGES:  # an expert group: the real scaler's view of its and the gateway's reports
            return self.experts.view(stage, now, pending, self._gateway_report(common))
        if stage == "prefill":
            queue_len = len(self.waiting) + len(self.prefill_wait) + sum(len(p.queue) for p in ready)
            signals = StageSignals(queued_tokens=float(self.waiting_prompt), queue_len=queue_len, **common)
            running = any(p.running for p in ready)
        else:
            signals = StageSignals(queued_tokens=float(self.waiting_output), queue_len=len(self.waiting),
                                   kv_used_tokens=float(sum(p.kv_reserved for p in ready)),
                                   kv_capacity_tokens=float(sum(p.kv_capacity for p in ready)), **common)
            running = any(p.admitted for p in ready)
        active = running or signals.queue_len > 0 or signals.prompt_tokens_per_s > 0
        return signals, active

    def _gateway_report(self, common: dict) -> LoadReport:
        """What the gateway publishes: requests without a first token yet (and their prompt tokens),
        streams, the arrival rates, the oldest deadline and the latencies it sees."""
        queue_len = len(self.waiting) + len(self.prefill_wait) + sum(len(p.queue) for p in self.pods["prefill"])
        ttft, itl = common["ttft_p95_s"], common["itl_p95_s"]
        return LoadReport(worker_id="gateway", stage="gateway", address="", host_id="", model="",
                          timestamp_unix=common["now"], queue_len=queue_len, queued_tokens=self.waiting_prompt,
                          running_seqs=sum(p.batch for p in self.pods["decode"]),
                          prompt_tokens_per_s=common["prompt_tokens_per_s"],
                          output_tokens_per_s=common["output_tokens_per_s"],
                          oldest_deadline_slack_s=common["oldest_deadline_slack_s"],
                          ttft_ms_p95=(ttft or 0.0) * 1000.0, itl_ms_p95=(itl or 0.0) * 1000.0)

    def _sample(self, stage: str, now: float, target: int, signals: StageSignals) -> None:
        pods = self.pods[stage]
        count = {s: 0 for s in (STARTING, READY, DRAINING)}
        unplaced = 0
        for p in pods:
            if p.gpu is None and p.state == STARTING:
                unplaced += 1
            else:
                count[p.state] += 1
        load = signals.output_tokens_per_s if stage == "decode" else signals.prompt_tokens_per_s  # experts: routed
        self.data.timeline.append(StageSample(
            now, stage, count[READY], count[STARTING], unplaced, count[DRAINING], target,
            sum(p.share for p in pods if p.gpu is not None), load, signals.queue_len))

    # ------------------------------------------------------------------ result

    def _result(self, now: float, wall_s: float) -> RunData:
        d = self.data
        d.arrival_s, d.prompt_tokens, d.output_tokens = self.arrival, self.prompt, self.output
        for rid, (a, f, e) in enumerate(zip(self.arrival, self.first, self.finish)):
            ok = not math.isnan(e)
            d.status.append("ok" if ok else "timeout")
            d.ttft_s.append(None if math.isnan(f) else f - a)
            d.e2e_s.append(e - a if ok else None)
            m = self.output[rid] - 1
            d.tpot_s.append((e - f) / m if ok and m > 0 else (0.0 if ok else None))
            s = self.started[rid]
            d.queue_s.append(None if math.isnan(s) else s - a)
            d.prefill_s.append(None if math.isnan(s) or math.isnan(f) else f - s)
        d.duration_s = now
        d.share_seconds = self.cluster.share_seconds
        d.gpu_seconds_occupied = self.cluster.gpu_seconds_occupied
        d.share_seconds_by_stage = dict(self.cluster.share_seconds_by_stage)
        pods_at: dict[float, int] = {}
        for s in d.timeline:
            pods_at[s.time] = pods_at.get(s.time, 0) + s.ready + s.starting + s.unplaced + s.draining
        d.stats = {"events": self.events, "wall_s": wall_s, "requests": len(self.arrival),
                   "unfinished": self.unfinished, "pods_created": self.next_id,
                   "peak_pods": max(pods_at.values(), default=0)}
        return d


def simulate(config: SimConfig, arrivals: Sequence[float], prompts: Sequence[int], outputs: Sequence[int]) -> RunData:
    return Simulator(config, arrivals, prompts, outputs).run()
