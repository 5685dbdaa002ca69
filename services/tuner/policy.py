"""The sidecar's decision each tick: which runtime config the worker should run now. Pure.

Inputs: the worker's load report (stage, current config, load, step timings), the pod's share,
the tuning table and the tuner settings. An experts server (stage experts/<group>) is tuned like
the others on the table's "experts" rows: its knob is the expert micro-batch (max_batch_size),
its load the routed tokens/s, its workload the routed tokens per call in flight, its step the
micro-batch. Rules, in order:
1. Share change (a restart under a new MPS percentage, a new CPU thread count...): choose for
   the new share at once, with no hysteresis and no dwell time.
2. Exploration in progress: keep it until it ends, or leave it at once if the observed p95
   breaks the SLO.
3. Otherwise selection.choose() among the table's configs at this share (measured or
   estimated, see TuningTable.points_at) for the observed load and workload, with hysteresis;
   a change waits until `min_dwell_s` after the last one unless the current config breaks the
   SLO or cannot carry the load.
4. Bounded exploration: at most once per `explore_interval_s`, for `explore_s`, when the pod is
   not overloaded, try a config that the table says meets the SLO, carries the load and is
   within `explore_margin` of the best throughput, and that was not explored at this share yet
   (so exploration stops once the near-best configs have been tried).
Online refinement: once a config has run `settle_s` with its batch full, its observed step
timings become an online observation of that config at this share (at most one per
`observe_interval_s`); the table averages it in by sample count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..common.load_report import LoadReport
from .config import TunerConfig
from .selection import Choice, choose
from .table import ProfilePoint, TuningTable, table_stage

KNOBS = ("max_batch_size", "max_concurrency", "prefill_chunk_size", "local_prefill_threshold")


@dataclass
class TunerState:
    share: float | None = None  # the share the last decision was made for
    changed_at: float = -math.inf  # when the sidecar last applied a config
    workload: dict[str, int] = field(default_factory=dict)  # last observed, for ticks that show none
    exploring: dict[str, int] | None = None
    explore_until: float = -math.inf
    last_explore: float = -math.inf
    last_observation: float = -math.inf
    rejected: set[tuple] = field(default_factory=set)  # configs the worker refused (INVALID_ARGUMENT)
    explored: set[tuple] = field(default_factory=set)  # (share, config) already explored

    def applied(self, config: dict[str, int], now: float, explore_s: float = 0.0) -> None:
        """The worker took `config` at `now`; explore_s > 0: as an exploration that long."""
        self.changed_at = now
        self.exploring = None
        if explore_s > 0:
            self.exploring, self.explore_until, self.last_explore = dict(config), now + explore_s, now
            self.explored.add((self.share, _config_key(config)))


@dataclass(frozen=True)
class Decision:
    apply: dict[str, int] | None  # the config to set now; None: keep the current one
    reason: str  # share_change, best, kept, overloaded, no_config_meets_slo, explore, dwell, no_profile
    choice: Choice | None = None
    observation: ProfilePoint | None = None


def current_config(report: LoadReport, like: dict[str, int]) -> dict[str, int]:
    """The worker's running config, restricted to the knobs the table's configs name."""
    if report.config is None:
        return {}
    return {k: int(getattr(report.config, k)) for k in like if k in KNOBS}


def observed_workload(report: LoadReport) -> dict[str, int]:
    if table_stage(report.stage) == "experts" and report.queue_len > 0 and report.queued_tokens > 0:
        return {"call_tokens": max(1, round(report.queued_tokens / report.queue_len))}
    if report.stage == "decode" and report.running_seqs > 0 and report.kv_used_tokens > 0:
        return {"context_len": max(1, round(report.kv_used_tokens / report.running_seqs))}
    if report.stage == "prefill" and report.queue_len > 0 and report.queued_tokens > 0:
        return {"prompt_len": max(1, round(report.queued_tokens / report.queue_len))}
    return {}


def observed_load(report: LoadReport, backlog_drain_s: float) -> float:
    # Prefill eats prompt tokens, decode makes output tokens, experts report routed tokens in.
    rate = report.output_tokens_per_s if report.stage == "decode" else report.prompt_tokens_per_s
    return rate + report.queued_tokens / backlog_drain_s


def _saturated(report: LoadReport) -> bool:
    batch = report.config.max_batch_size if report.config else 0
    if report.stage == "decode":
        return batch > 0 and report.running_seqs >= batch
    if table_stage(report.stage) == "experts":  # routed tokens in flight fill a micro-batch
        return report.queued_tokens >= batch > 0
    return report.queue_len >= batch > 0


def _config_key(config: dict[str, int]) -> tuple:
    return tuple(sorted(config.items()))


def decide(
    report: LoadReport, table: TuningTable, settings: TunerConfig, state: TunerState,
    share: float, device: str, now: float,
) -> Decision:
    """One tick (see the module docstring). Updates `state`'s share, workload and observation
    time; the caller calls state.applied() once the worker took a config."""
    stage = table_stage(report.stage)
    slo = settings.slo_ms(stage)
    workload = observed_workload(report) or state.workload
    state.workload = workload
    target = workload or (table.workloads(report.model, stage, device) or [{}])[-1]  # unknown: the largest
    rows = [p for p in table.points_at(report.model, stage, device, share, target)
            if _config_key(p.config) not in state.rejected]
    if not rows:
        state.share = share
        return Decision(None, "no_profile")
    current = current_config(report, rows[0].config)
    observation = _observe(report, settings, state, share, device, current, rows[0].workload, now)
    load = observed_load(report, settings.backlog_drain_s)

    if state.share is None or abs(state.share - share) > 1e-9:
        first = state.share is None
        state.share = share
        choice = choose(rows, load, slo)
        reason = choice.reason if first else "share_change"
        return Decision(choice.config if choice.config != current else None, reason, choice, observation)

    if state.exploring is not None:
        broke = report.step_ms_p95 > slo and current == state.exploring
        if now < state.explore_until and not broke:
            return Decision(None, "explore", None, observation)
        state.exploring = None
        choice = choose(rows, load, slo)  # back to the table's choice, no hysteresis for the explored one
        return Decision(choice.config if choice.config != current else None, choice.reason, choice, observation)

    choice = choose(rows, load, slo, current=current, hysteresis=settings.hysteresis)
    if choice.config != current:
        mine = [p for p in rows if p.config == current]
        urgent = not mine or not mine[0].meets(slo) or mine[0].throughput_tokens_per_s < load
        if not urgent and now - state.changed_at < settings.min_dwell_s:
            return Decision(None, "dwell", choice, observation)
        return Decision(choice.config, choice.reason, choice, observation)

    candidate = _exploration(rows, choice, settings, state, load, slo, share, now)
    if candidate is not None:
        return Decision(candidate, "explore", choice, observation)
    return Decision(None, choice.reason, choice, observation)


def _exploration(rows, choice: Choice, settings: TunerConfig, state: TunerState, load: float, slo: float,
                 share: float, now: float) -> dict[str, int] | None:
    if settings.explore_interval_s <= 0 or choice.reason not in ("best", "kept"):
        return None
    if now - state.last_explore < settings.explore_interval_s or now - state.changed_at < settings.min_dwell_s:
        return None
    best = max(p.throughput_tokens_per_s for p in rows if p.meets(slo))
    untried = [p for p in rows if (share, _config_key(p.config)) not in state.explored
               and p.config != choice.config and p.meets(slo)
               and p.throughput_tokens_per_s >= max(load, (1 - settings.explore_margin) * best)]
    if not untried:
        return None
    return dict(max(untried, key=lambda p: p.throughput_tokens_per_s).config)


def _observe(report: LoadReport, settings: TunerConfig, state: TunerState, share: float, device: str,
             current: dict[str, int], workload: dict[str, int], now: float) -> ProfilePoint | None:
    """An online observation of the running config, when its timings are its own and full."""
    if not current or report.step_ms_p50 <= 0 or not _saturated(report):
        return None
    if now - state.changed_at < settings.settle_s or now - state.last_observation < settings.observe_interval_s:
        return None
    state.last_observation = now
    if report.stage == "decode":
        throughput = current.get("max_batch_size", 1) * 1000.0 / report.step_ms_p50
    else:
        throughput = report.prompt_tokens_per_s
    if throughput <= 0:
        return None
    return ProfilePoint(
        model=report.model, stage=table_stage(report.stage), device=device, share=share, config=dict(current),
        throughput_tokens_per_s=throughput, latency_p50_ms=report.step_ms_p50, latency_p95_ms=report.step_ms_p95,
        samples=1, source="online", updated_at=now, workload=dict(workload),
    )
