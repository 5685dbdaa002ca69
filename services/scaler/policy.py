"""elastune's replica policy for one stage: signals -> smoothed needs -> a damped decision. Pure."""

from __future__ import annotations

import math

from services.scaler.signals import (
    NEED_REASONS,
    REASON_HOLD_COOLDOWN,
    REASON_HOLD_DEAD_BAND,
    REASON_HOLD_PENDING,
    REASON_HOLD_STEADY,
    REASON_HOLD_UNSAFE,
    REASON_KV_PRESSURE,
    REASON_MAX,
    REASON_MIN,
    REASON_QUEUE_DEADLINE,
    REASON_SCALE_DOWN_SAFE,
    REASON_SLO_VIOLATION,
    REASON_TOKEN_RATE,
    ControllerState,
    Decision,
    StagePolicyConfig,
    StageSignals,
)

_EPS = 1e-9


def ema_alpha(dt: float, half_life_s: float) -> float:
    """Weight of a new sample `dt` seconds after the previous one: 1 - 2**(-dt / half_life)."""
    if half_life_s <= 0:
        return 1.0
    return 1.0 - 2.0 ** (-max(dt, 0.0) / half_life_s)


def _smooth(
    ema: dict[str, float], times: dict[str, float], key: str, sample: float | None, now: float, hl: float
) -> None:
    """Fold one sample into ema[key]; the first sample initialises, None forgets (no evidence)."""
    if sample is None:
        ema.pop(key, None)
        times.pop(key, None)
        return
    if key not in ema:
        ema[key] = sample
    else:
        ema[key] += ema_alpha(now - times[key], hl) * (sample - ema[key])
    times[key] = now


def _arrival_rate(signals: StageSignals, config: StagePolicyConfig) -> float:
    source = config.resolved_rate_source()
    if source == "prompt":
        rate = signals.prompt_tokens_per_s
    elif source == "output":
        rate = signals.output_tokens_per_s
    else:
        rate = signals.prompt_tokens_per_s + signals.output_tokens_per_s
    return max(rate, 0.0)


def _slo_violated(ema: dict[str, float], config: StagePolicyConfig) -> bool:
    ttft, itl = ema.get("ttft_p95"), ema.get("itl_p95")
    return (config.slo_ttft_s is not None and ttft is not None and ttft > config.slo_ttft_s) or (
        config.slo_itl_s is not None and itl is not None and itl > config.slo_itl_s
    )


def drain_window(signals: StageSignals, config: StagePolicyConfig) -> float:
    """Seconds the backlog may take: the drain target or the oldest deadline, floored at min_drain_s."""
    return max(min(config.queue_drain_target_s, signals.oldest_deadline_slack_s), config.min_drain_s)


def smoothed_load(signals: StageSignals, config: StagePolicyConfig, state: ControllerState) -> float:
    """Tokens/s the stage must serve, for a metric the HPA divides by per-pod capacity: the
    smoothed arrival rate in `state` (the state decide() returned) plus the backlog drained
    over drain_window(). The raw-mode counterpart of the token-rate and queue needs."""
    rate = state.ema.get("rate", _arrival_rate(signals, config))
    queued = max(signals.queued_tokens, 0.0)
    return rate + queued / drain_window(signals, config) if queued > 0 else rate


def compute_needs(
    signals: StageSignals, config: StagePolicyConfig, rate: float, kv_per_pod: float | None, violated: bool
) -> dict[str, float]:
    """Fractional replica needs, keyed by the reason each one would give."""
    pod = config.pod_tokens_per_s()
    needs = {REASON_TOKEN_RATE: rate / (pod * config.target_utilization)}
    # The backlog drains flat out on top of the arrival rate, before the tighter of the
    # drain target and the oldest deadline (floored so a missed deadline stays finite).
    queued = max(signals.queued_tokens, 0.0)
    needs[REASON_QUEUE_DEADLINE] = (rate + queued / drain_window(signals, config)) / pod if queued > 0 else 0.0
    kv_need = 0.0
    if kv_per_pod:
        kv_need = max(signals.kv_used_tokens, 0.0) / (kv_per_pod * config.kv_high_watermark)
    needs[REASON_KV_PRESSURE] = kv_need
    ready = signals.ready_replicas
    needs[REASON_SLO_VIOLATION] = float(ready + 1) if violated and ready > 0 else 0.0
    return needs


def _ceil(need: float) -> int:
    return max(math.ceil(need - _EPS), 0)


def decide(
    signals: StageSignals, config: StagePolicyConfig, state: ControllerState
) -> tuple[Decision, ControllerState]:
    """One decision for one stage; returns it with the next state (the inputs are untouched).

    Terms: need = max of the fractional needs; target = ceil(need) clamped to [min, max];
    current = ready + pending; intent = the last desired count (current on the first call).
    Invariants:
    - min <= desired <= max, always: an intent below min goes straight to the target (no
      dead band, cooldown or step limit), an intent above max straight to max.
    - Up only when target > max(intent, current) (pending pods count as present), the need
      leaves the dead band (skipped while an SLO is violated), and scale_up_cooldown_s has
      passed since the last scale-up; at most scale_up_max_step per decision.
    - Down only when the need is below the dead band, scale_down_cooldown_s has passed since
      the last scale event of either direction, no SLO is violated, and the peak need over
      scale_down_window_s fits in the new count with scale_down_headroom to spare (N-1 pods
      stay under capacity * target_utilization); at most scale_down_max_step per decision.
    - A hold keeps the intent, so a scale-down the platform has not carried out yet is not
      withdrawn. Same (signals, config, state) -> same result, before or after a checkpoint.
    """
    now, hl = signals.now, config.ema_half_life_s
    ema, times = dict(state.ema), dict(state.ema_time)
    _smooth(ema, times, "rate", _arrival_rate(signals, config), now, hl)
    _smooth(ema, times, "ttft_p95", signals.ttft_p95_s, now, hl)
    _smooth(ema, times, "itl_p95", signals.itl_p95_s, now, hl)
    ready, pending = signals.ready_replicas, signals.pending_replicas
    kv_per_pod = state.kv_tokens_per_pod
    if ready > 0 and signals.kv_capacity_tokens > 0:
        kv_per_pod = signals.kv_capacity_tokens / ready
    violated = _slo_violated(ema, config)

    needs = compute_needs(signals, config, ema["rate"], kv_per_pod, violated)
    need = max(needs.values())
    driver = max(NEED_REASONS, key=lambda name: needs[name])  # ties: earliest in NEED_REASONS
    history = tuple((t, n) for t, n in state.need_history if t > now - config.scale_down_window_s)
    history += ((now, need),)
    peak = max(n for _, n in history)

    current = ready + pending
    intent = state.last_desired if state.last_desired is not None else current
    desired, reason = _choose(config, state, now, need, peak, driver, violated, ready, pending, intent)

    decision = Decision(desired, reason, {**needs, "need": need, "peak_need": peak})
    new_state = ControllerState(
        ema=ema,
        ema_time=times,
        need_history=history,
        kv_tokens_per_pod=kv_per_pod,
        last_scale_up_time=now if desired > intent else state.last_scale_up_time,
        last_scale_down_time=now if desired < intent else state.last_scale_down_time,
        last_desired=desired,
        last_decision=decision,
    )
    return decision, new_state


def _choose(
    config: StagePolicyConfig,
    state: ControllerState,
    now: float,
    need: float,
    peak: float,
    driver: str,
    violated: bool,
    ready: int,
    pending: int,
    intent: int,
) -> tuple[int, str]:
    """The damping and rate-limit rules of decide(), as (desired, reason)."""
    lo, hi, band = config.min_replicas, config.max_replicas, config.dead_band
    raw = _ceil(need)
    target = min(max(raw, lo), hi)
    bound = REASON_MIN if raw < lo else REASON_MAX if raw > hi else None
    if intent < lo:
        return target, REASON_MIN if target == lo else bound or driver
    if intent > hi:
        return hi, REASON_MAX

    up_base = max(ready + pending, intent)
    if target > up_base:
        if need <= up_base * (1 + band) and not violated:  # an SLO miss always gets its pod
            return intent, REASON_HOLD_DEAD_BAND
        last_up = state.last_scale_up_time
        if last_up is not None and now - last_up < config.scale_up_cooldown_s:
            return intent, REASON_HOLD_COOLDOWN
        desired = min(target, up_base + config.scale_up_max_step.up(up_base))
        return desired, bound if bound and desired == target else driver

    if target < intent:
        if need >= intent * (1 - band):
            return intent, REASON_HOLD_DEAD_BAND
        stamps = [t for t in (state.last_scale_up_time, state.last_scale_down_time) if t is not None]
        if stamps and now - max(stamps) < config.scale_down_cooldown_s:
            return intent, REASON_HOLD_COOLDOWN
        fits = _ceil(peak / (1 - config.scale_down_headroom))
        floor = max(target, fits, intent - config.scale_down_max_step.down(intent))
        if violated or floor >= intent:
            return intent, REASON_HOLD_UNSAFE
        return floor, REASON_MIN if bound == REASON_MIN and floor == lo else REASON_SCALE_DOWN_SAFE

    # intent <= target <= ready + pending: the pods asked for already cover the need.
    if pending > 0 and target > ready:
        return target, REASON_HOLD_PENDING
    if target == intent:
        return intent, bound or REASON_HOLD_STEADY
    return target, driver  # withdraws part of a scale-down the platform has not carried out


def apply_ratio_band(
    prefill_desired: int, decode_desired: int, band: tuple[float, float] | None
) -> tuple[int, int]:
    """Keep prefill:decode replicas within [band[0], band[1]] by raising the short side only.

    Raising never starves a stage of what its own policy asked for; the caller clamps to
    each stage's max afterwards. No band, or both stages at zero, leaves the counts alone.
    """
    if band is None or (prefill_desired == 0 and decode_desired == 0):
        return prefill_desired, decode_desired
    low, high = band
    if not 0 < low <= high:
        raise ValueError("pd_ratio_band must satisfy 0 < min <= max")
    prefill, decode = prefill_desired, decode_desired
    if prefill < low * decode - _EPS:
        prefill = math.ceil(low * decode - _EPS)
    if prefill > high * decode + _EPS:
        decode = math.ceil(prefill / high - _EPS)
    return prefill, decode
