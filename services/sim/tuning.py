"""The tuner's view of a simulated model: a TuningTable made from the profile, and per-stage plans.

The table holds what `elastune profile` would measure on the device the profile describes:
for each share on a grid and each runtime config, throughput and per-token (decode) or per-batch
(prefill) latency at the workload's typical lengths. The plan uses the tuner's own pure code
(services/tuner: knees_by_batch, best_within_slo, choose) to pick each stage's share and config:
per batch size the knee share, then among the (batch, knee) pairs within the SLO and within epsilon
of the most tokens/s per GPU, the one with the lowest latency. Pure.

MoE runs (a MoeSpec): the table also has "experts" rows (expert micro-batch x share, over the mix
of decode and prefill calls the workload makes: experts_calls), and the decode and prefill rows include what a
step or micro-batch waits on its experts when they are idle (at a whole device and the profile's
micro-batch), as profiling the MoE model's own stages against its expert groups would measure.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.tuner.knee import knees_by_batch
from services.tuner.selection import choose
from services.tuner.table import ProfilePoint, TuningTable

from .moe import MoeSpec, typical_call_pairs, unloaded_wait_ms
from .profile import Profile

SHARES = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
DECODE_BATCHES = (8, 16, 32, 64, 128, 256, 512)
PREFILL_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
EXPERTS_MICRO_BATCHES = (16, 64, 256, 1024, 4096)  # routed pairs per expert pass


@dataclass(frozen=True)
class Workload:
    """Typical request shape the table is measured at."""

    mean_prompt: float
    mean_output: float
    mean_prompt_sq: float = 0.0  # E[prompt^2] (attention's quadratic term); 0: mean_prompt^2

    @property
    def prompt_sq(self) -> float:
        return self.mean_prompt_sq or self.mean_prompt**2

    @property
    def mean_context(self) -> float:  # a decoding sequence's context, averaged over its life
        return self.mean_prompt + self.mean_output / 2

    @property
    def kv_per_seq(self) -> float:  # what admission reserves
        return self.mean_prompt + self.mean_output


def _experts_wait(profile: Profile, moe: MoeSpec | None, tokens: float) -> float:
    if moe is None:
        return 0.0
    model = profile.experts_model()
    return unloaded_wait_ms(moe, model, 1.0, model.max_batch_size, tokens)


def _decode_point(profile: Profile, share: float, batch: int, work: Workload, moe: MoeSpec | None = None) -> ProfilePoint:
    model = profile.decode
    fits = max(int(model.kv_capacity(share) // work.kv_per_seq), 1)
    running = min(batch, fits)  # KV caps the batch the config asks for
    step_ms = model.step_ms(running, running * work.mean_context, share)
    if moe is not None:
        step_ms += _experts_wait(profile, moe, running)
    return ProfilePoint(profile.name, "decode", profile.device, share, {"max_batch_size": batch},
                        running / step_ms * 1000.0, step_ms, step_ms)


def _prefill_point(profile: Profile, share: float, batch_tokens: int, work: Workload,
                   moe: MoeSpec | None = None) -> ProfilePoint:
    model = profile.prefill
    length = max(work.mean_prompt, 1.0)
    n = max(int(batch_tokens // length), 1)
    ms = model.batch_ms(n * length, n * work.prompt_sq, n, share)
    if moe is not None:
        ms += _experts_wait(profile, moe, n * length)
    return ProfilePoint(profile.name, "prefill", profile.device, share, {"max_batch_tokens": batch_tokens},
                        n * length / ms * 1000.0, ms, ms)


Calls = tuple[tuple[int, float], ...]  # (routed pairs in a call, share of all pairs that come in such calls)


def _experts_point(profile: Profile, share: float, micro_batch: int, calls: Calls) -> ProfilePoint:
    """What `elastune profile --stages experts` measures, for the run's mix of calls: each call cut
    into micro-batches; throughput = routed pairs per second of device time over the mix, latency
    one micro-batch of the largest call (the longest the device is held)."""
    model = profile.experts_model()
    ms_per_pair = sum(weight * model.call_ms(pairs, share, micro_batch) / pairs for pairs, weight in calls)
    largest = max(pairs for pairs, _ in calls)
    piece_ms = model.call_ms(min(largest, micro_batch), share, micro_batch)
    mean_call = int(round(sum(pairs * weight for pairs, weight in calls)))
    return ProfilePoint(profile.name, "experts", profile.device, share, {"max_batch_size": micro_batch},
                        1000.0 / ms_per_pair, piece_ms, piece_ms, workload={"call_tokens": mean_call})


def experts_calls(profile: Profile, moe: MoeSpec, work: Workload) -> Calls:
    """The calls the experts rows are measured over: a full decode batch's and a full prefill
    micro-batch's call to an average group, weighted by the pairs each kind carries (the
    workload's output and prompt tokens: prefill calls are few but carry most pairs when prompts
    are longer than outputs)."""
    prompt = work.mean_prompt / max(work.mean_prompt + work.mean_output, 1e-9)
    return ((typical_call_pairs(profile.decode.max_batch_size, moe), 1.0 - prompt),
            (typical_call_pairs(profile.prefill.max_batch_tokens, moe), prompt))


def build_table(profile: Profile, work: Workload, shares: tuple[float, ...] = SHARES,
                moe: MoeSpec | None = None) -> TuningTable:
    """The table (see the module docstring for what an MoE run adds)."""
    table = TuningTable()
    calls = experts_calls(profile, moe, work) if moe is not None else ()
    for share in shares:
        for batch in DECODE_BATCHES:
            table.add(_decode_point(profile, share, batch, work, moe))
        for tokens in PREFILL_TOKENS:
            table.add(_prefill_point(profile, share, tokens, work, moe))
        if moe is not None:
            for micro_batch in EXPERTS_MICRO_BATCHES:
                table.add(_experts_point(profile, share, micro_batch, calls))
    return table


@dataclass(frozen=True)
class StagePlan:
    stage: str
    share: float
    config: dict[str, int]
    tokens_per_s: float  # one pod's capacity within the SLO at this share and config

    @property
    def per_gpu(self) -> float:
        return self.tokens_per_s / self.share


def plan_stage(table: TuningTable, profile: Profile, stage: str, slo_ms: float, epsilon: float = 0.05) -> StagePlan:
    """Knee share per config, then the lowest-latency config within epsilon of the best tokens/s per GPU."""
    points = [p for s in table.shares(profile.name, stage, profile.device)
              for p in table.points(profile.name, stage, profile.device, s)]
    within = [p for p in points if p.meets(slo_ms)]
    if not within:
        raise ValueError(f"{stage}: no profiled config meets the {slo_ms} ms SLO at any share")
    key = "max_batch_tokens" if stage == "prefill" else "max_batch_size"
    # knees_by_batch groups by max_batch_size; prefill configs group by batch tokens instead.
    grouped = [ProfilePoint(p.model, p.stage, p.device, p.share, {"max_batch_size": p.config[key]},
                            p.throughput_tokens_per_s, p.latency_p50_ms, p.latency_p95_ms) for p in within]
    knees = knees_by_batch(grouped, epsilon)
    candidates = []
    for size, share in knees.items():
        point = next(p for p in within if p.config[key] == size and abs(p.share - share) < 1e-9)
        plan = StagePlan(stage, share, dict(point.config), point.throughput_tokens_per_s)
        candidates.append((plan, point.latency_p95_ms or 0.0))
    # Within epsilon of the most tokens/s per GPU, the lowest latency wins: a bigger batch that
    # buys 1% more throughput is not worth doubling every request's wait behind it.
    top = max(plan.per_gpu for plan, _ in candidates)
    near = [(latency, -plan.share, plan) for plan, latency in candidates if plan.per_gpu >= (1 - epsilon) * top]
    return min(near, key=lambda c: c[:2])[2]


def default_plan(profile: Profile, work: Workload, stage: str, moe: MoeSpec | None = None) -> StagePlan:
    """What an untuned deployment runs: a whole GPU per pod and the profile's default config."""
    if stage == "experts":
        p = _experts_point(profile, 1.0, profile.experts_model().max_batch_size, experts_calls(profile, moe, work))
        return StagePlan(stage, 1.0, dict(p.config), p.throughput_tokens_per_s)
    if stage == "decode":
        p = _decode_point(profile, 1.0, profile.decode.max_batch_size, work, moe)
        return StagePlan(stage, 1.0, dict(p.config), p.throughput_tokens_per_s)
    p = _prefill_point(profile, 1.0, profile.prefill.max_batch_tokens, work, moe)
    return StagePlan(stage, 1.0, dict(p.config), p.throughput_tokens_per_s)


def plan_point(profile: Profile, work: Workload, plan: StagePlan, moe: MoeSpec | None = None) -> ProfilePoint:
    """The table row a prefill or decode plan runs at (what its tokens_per_s came from)."""
    if plan.stage == "decode":
        return _decode_point(profile, plan.share, plan.config["max_batch_size"], work, moe)
    if plan.stage == "prefill":
        return _prefill_point(profile, plan.share, plan.config["max_batch_tokens"], work, moe)
    raise ValueError(f"plan_point: prefill or decode, not {plan.stage}")


def experts_wait_ms(profile: Profile, moe: MoeSpec, tokens: float) -> float:
    """What the table's prefill and decode rows count for `tokens` tokens' idle experts."""
    return _experts_wait(profile, moe, tokens)


def retune(table: TuningTable, profile: Profile, plan: StagePlan, load_per_pod: float, slo_ms: float,
           current: dict[str, int]) -> dict[str, int]:
    """The inner loop: the config a pod at the plan's share should run at its observed load."""
    points = table.points(profile.name, plan.stage, profile.device, plan.share)
    return choose(points, load_per_pod, slo_ms, current).config
