"""The Markdown report of an experiment folder: what ran, the figures per run, the goals, the plots.
Pure text from the summaries (plus the figure file names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GOAL_ATTAINMENT = 0.99
GOAL_SAVING = 0.35
GOAL_REVERSALS = 2
REFERENCE = "static_peak"
CANDIDATE = "elastic_tuned"


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def saving(summaries: dict[str, dict], run: str, reference: str = REFERENCE) -> float | None:
    """Fraction of the reference run's GPU-seconds the run saves (None: no reference)."""
    ref = summaries.get(reference, {}).get("gpu_seconds")
    mine = summaries.get(run, {}).get("gpu_seconds")
    if not ref or mine is None:
        return None
    return 1.0 - mine / ref


def _run_table(summaries: dict[str, dict], stages: tuple[str, ...]) -> list[str]:
    head = ["run", "SLO met %", "GPU-s", f"saved vs {REFERENCE}", "GPU-s/req", "goodput req/s/GPU",
            "TTFT p50/p95/p99 ms", "TPOT p95 ms", "ITL p95 ms"]
    for stage in stages:
        head += [f"{stage} mean replicas", f"{stage} reversals /10min (worst)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run, s in summaries.items():
        cut = saving(summaries, run)
        row = [run, _f(s["slo_attainment"] * 100, 2), _f(s["gpu_seconds"], 0),
               "-" if cut is None else f"{cut * 100:.1f}%", _f(s["gpu_seconds_per_request"], 3),
               _f(s["goodput_rps_per_gpu"], 2),
               f"{_f(s['ttft_p50_ms'])} / {_f(s['ttft_p95_ms'])} / {_f(s['ttft_p99_ms'])}",
               _f(s["tpot_p95_ms"]), _f(s["itl_p95_ms"])]
        for stage in stages:
            st = s["stages"].get(stage, {})
            row += [_f(st.get("mean_replicas"), 2),
                    f"{_f(st.get('reversals_per_10min'), 2)} ({_f(st.get('reversals_worst_10min'))})"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _stage_table(summaries: dict[str, dict]) -> list[str]:
    head = ["run", "prefill queue p50/p95/p99 ms", "prefill service p50/p95/p99 ms",
            "decode ITL p50/p95/p99 ms", "e2e p50/p95/p99 ms", "tokens/s", "req/s", "failed", "scale events"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run, s in summaries.items():
        pre, dec = s["stages"].get("prefill", {}), s["stages"].get("decode", {})

        def trio(d: dict, prefix: str) -> str:
            return " / ".join(_f(d.get(f"{prefix}p{q}_ms")) for q in (50, 95, 99))

        events = sum(st.get("scale_events", 0) for st in s["stages"].values())
        lines.append("| " + " | ".join([run, trio(pre, "queue_"), trio(pre, "service_"), trio(dec, "itl_"),
                                        trio(s, "e2e_"), _f(s["tokens_per_s"], 0), _f(s["requests_per_s"], 2),
                                        str(s["failed"]), str(events)]) + " |")
    return lines


def by_stage(summaries: dict[str, dict], stages: tuple[str, ...]) -> list[str]:
    """Per run and stage: mean (max) replicas and GPU-seconds, expert groups beside prefill and decode."""
    head = ["run"] + [f"{stage} replicas mean (max) / GPU-s" for stage in stages]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run, s in summaries.items():
        row = [run]
        for stage in stages:
            st = s["stages"].get(stage, {})
            row.append(f"{_f(st.get('mean_replicas'), 2)} ({_f(st.get('max_replicas'))}) / {_f(st.get('gpu_seconds'), 0)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def goals(summaries: dict[str, dict], stages: tuple[str, ...]) -> list[str]:
    s = summaries.get(CANDIDATE)
    if s is None:
        return [f"- No `{CANDIDATE}` run: the goals are not evaluated."]
    cut = saving(summaries, CANDIDATE)
    worst = max((s["stages"].get(st, {}).get("reversals_worst_10min", 0) for st in stages), default=0)
    att = s["slo_attainment"]
    return [
        f"- SLO attainment >= {GOAL_ATTAINMENT:.0%}: **{att * 100:.2f}%** -> {'met' if att >= GOAL_ATTAINMENT else 'NOT met'}",
        f"- GPU-seconds >= {GOAL_SAVING:.0%} below `{REFERENCE}`: "
        + ("no reference run" if cut is None else f"**{cut * 100:.1f}%** -> {'met' if cut >= GOAL_SAVING else 'NOT met'}"),
        f"- <= {GOAL_REVERSALS} direction reversals per 10 minutes per stage (worst window): **{worst}** -> "
        f"{'met' if worst <= GOAL_REVERSALS else 'NOT met'}",
    ]


def following(summaries: dict[str, dict], stages: tuple[str, ...], listed: int = 8) -> list[str]:
    """Per scaled run and stage: when the count changed and what the load was then, against the
    run's mean load; the words say whether ups came at high load and downs at low load."""
    lines = []
    for run, s in summaries.items():
        for stage in stages:
            st = s["stages"].get(stage, {})
            changes, mean = st.get("changes") or [], st.get("load_mean_tokens_per_s") or 0.0
            if not changes or mean <= 0:
                continue

            def ratio(c: dict) -> float | None:
                return None if c["load"] is None else c["load"] / mean

            shown = [f"{'up' if c['to'] > c['from'] else 'down'} {c['from']}->{c['to']} at {c['time']:.0f} s "
                     + ("(before a full minute of load)" if c["load"] is None else
                        f"({_f(c['load'], 0)} tok/s, {_f(ratio(c), 2)}x)") for c in changes[:listed]]
            more = f"; ... {len(changes) - listed} more" if len(changes) > listed else ""
            ups = [r for c in changes if c["to"] > c["from"] and (r := ratio(c)) is not None]
            downs = [r for c in changes if c["to"] < c["from"] and (r := ratio(c)) is not None]
            verdict = []
            if ups:
                verdict.append(f"scaled up at {sum(ups) / len(ups):.2f}x the run's mean load on average")
            if downs:
                verdict.append(f"down at {sum(downs) / len(downs):.2f}x")
            followed = bool(ups) and (not downs or min(ups) > max(downs))
            lines.append(f"- `{run}` {stage} (mean load {mean:,.0f} tok/s): {', '.join(verdict)}"
                         f"{' -- every up at a higher load than every down: the count follows the load' if followed else ''}. "
                         + "; ".join(shown) + more)
    return lines or ["- No run changed its replica count."]


def render(meta: dict, summaries: dict[str, dict], figures: list[str]) -> str:
    stages = tuple(meta.get("stages", ("prefill", "decode")))
    slo = meta.get("slo", {})
    lines = [
        f"# Experiment `{meta['name']}`", "",
        f"- mode: **{meta['mode']}**; seed {meta['seed']}; commit `{meta['commit']}`; "
        f"machine: {meta['machine'].get('host')} ({meta['machine'].get('cpus')} CPUs, {meta['machine'].get('platform')})",
        f"- SLO: TTFT <= {slo.get('ttft_s')} s and time per output token <= {slo.get('tpot_s')} s, per request",
        f"- workload: {meta.get('workload_desc', '')}",
        f"- workload summary: {meta.get('workload_summary', {})}",
    ]
    if meta.get("profile"):
        p = meta["profile"]
        lines.append(f"- profile: `{p['name']}` on {p['device']} -- {p['source']}")
    if meta.get("cluster"):
        lines.append(f"- cluster: {meta['cluster']}")
    if meta.get("moe"):
        m = meta["moe"]
        lines.append(f"- MoE: {m['experts']} experts, top-{m['top_k']}, {m['layers']} MoE layers, {m['groups']} groups, "
                     f"Zipf skew {m['skew']}; share of routed pairs per group {m['pair_share']}; "
                     f"experts service time: {m['experts_model']}")
    if meta.get("plans"):
        lines.append("- per-run share and config: " + "; ".join(f"{r}: {v}" for r, v in meta["plans"].items()))
    lines += ["", "## Runs", "", *_run_table(summaries, stages), "",
              "GPU-s: seconds x GPU share of every pod while placed (cold starts and draining included). "
              "Goodput: requests/s meeting the SLO per mean allocated GPU.", "",
              "## Per stage", "", *_stage_table(summaries), "",
              "## Replicas and GPU-seconds by stage", "", *by_stage(summaries, stages), "", "## Goals", "", *goals(summaries, stages), "",
              "## Scale changes against load", "",
              "Load: the stage's arrival rate (prompt tokens/s for prefill, output tokens/s for decode) "
              "averaged over the minute before each change, and as a multiple of the run's mean.", "",
              *following(summaries, stages), ""]
    if "sim_wall_s" in meta:
        lines += ["## Simulator", "", "| run | requests | events | wall s | peak pods |", "| --- | ---: | ---: | ---: | ---: |"]
        for run, st in meta["sim_wall_s"].items():
            lines.append(f"| {run} | {st.get('requests')} | {st.get('events')} | {_f(st.get('wall_s'), 2)} | {st.get('peak_pods')} |")
        lines.append("")
    lines += ["## Figures", ""]
    if not figures:
        lines.append("No figures: matplotlib is not installed (`pip install matplotlib`).")
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
