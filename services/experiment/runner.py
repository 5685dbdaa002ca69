"""`elastune experiment run CONFIG.yaml` and `elastune experiment report DIR`.

A results folder holds everything needed to read and redo the experiment:

    <out>/<name>-<UTC time>/
      config.yaml        the config as given
      meta.json          seed, commit, machine, mode, profile, workload summary, per-run plans
      runs/<run>/        the run's RunData (services/experiment/rundata.py) and summary.json
      summary.json       every run's figures
      report.md, *.png   the report and its figures (re-made from the files by `experiment report`)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path

from bench import workloads
from bench.meta import commit, machine

from . import plots, report, rundata
from .baselines import demand, moe_spec, sim_config
from .config import ExperimentConfig, load
from .metrics import Slo, summarize
from .workload import build, default_trace, load_steps

DEFAULT_OUT = "results/experiments"


def _describe(cfg: ExperimentConfig) -> str:
    w = cfg.workload
    if w.kind == "trace":
        return (f"trace {w.path or default_trace()} window [{w.start_s}, +{w.duration_s or 'all'}] s, replayed "
                f"{w.rate_scale}x faster, {w.rate_multiplier}x the requests (jittered copies), "
                f"max_context {w.max_context or 'as is'}")
    if w.kind == "steps":
        return f"Poisson steps {list(w.steps)} for {w.duration_s} s"
    return f"{w.kind} rate {w.rate} for {w.duration_s} s"


def run_experiment(config_path: str | Path, out: str | Path = DEFAULT_OUT,
                   echo: Callable[[str], None] = print) -> Path:
    cfg = load(config_path)
    folder = Path(out) / f"{cfg.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    folder.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(config_path, folder / "config.yaml")
    requests = build(cfg.workload, cfg.seed)
    if not requests:
        raise ValueError(f"{config_path}: the workload has no requests")
    slo = Slo(cfg.slo_ttft_s, cfg.slo_tpot_s)
    meta: dict = {
        "name": cfg.name, "mode": cfg.mode, "seed": cfg.seed, "commit": commit(), "machine": machine(),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, "runs": list(cfg.runs),
        "workload_desc": _describe(cfg),
        "workload_summary": {k: round(v, 2) for k, v in workloads.summary(requests).items()},
        "load_steps": load_steps(cfg.workload), "stages": ["prefill", "decode"], "plans": {},
    }
    echo(f"experiment {cfg.name}: {len(requests)} requests, mode {cfg.mode}, runs {', '.join(cfg.runs)}")
    arrivals = [r.arrival_s for r in requests]
    prompts = [r.prompt_tokens for r in requests]
    outputs = [r.output_tokens for r in requests]
    if cfg.mode == "sim":
        from services.sim.profile import load_profile
        from services.sim.simulator import simulate

        profile = load_profile(cfg.sim.profile)
        if not cfg.sim.shared_host:  # a cluster of such devices, not the one host the profile was calibrated on
            profile = replace(profile, stack=replace(profile.stack, host_cores=0.0))
        need = demand(requests)
        meta["profile"] = {"name": profile.name, "device": profile.device, "source": profile.source,
                           "path": cfg.sim.profile}
        meta["cluster"] = f"{cfg.sim.gpus} GPUs, polling every {cfg.sim.interval_s} s"
        meta["sim_wall_s"] = {}
        spec = moe_spec(cfg)
        if spec is not None:
            experts = profile.experts_model()
            meta["stages"] += list(spec.stages())
            meta["moe"] = {"experts": spec.experts, "top_k": spec.top_k, "groups": spec.groups, "skew": spec.skew,
                           "layers": experts.layers, "experts_model": experts.source or "from the profile",
                           "pair_share": {s: round(f, 4) for s, f in spec.group_shares().items()}}
    for run in cfg.runs:
        started = time.perf_counter()
        if cfg.mode == "sim":
            setup = sim_config(cfg, run, profile, need)
            meta["plans"][run] = {s: {"share": p.share, **p.config} for s, p in setup.plans.items()}
            data = simulate(setup, arrivals, prompts, outputs)
            meta["sim_wall_s"][run] = data.stats
        else:
            from .real import run_real

            data = run_real(cfg, run, requests, folder / "runs" / run, echo)
        summary = summarize(data, slo, stages=tuple(meta["stages"]), load_steps=meta["load_steps"] or None)
        rundata.save(data, folder / "runs" / run)
        (folder / "runs" / run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        echo(f"  {run:<18} SLO met {summary['slo_attainment'] * 100:6.2f}%  GPU-s {summary['gpu_seconds']:10.0f}  "
             f"TTFT p99 {summary['ttft_p99_ms'] or 0:8.0f} ms  ({time.perf_counter() - started:.1f} s)")
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_report(folder)
    echo(f"wrote {folder / 'report.md'}")
    return folder


def write_report(folder: str | Path) -> Path:
    """(Re)compute every run's summary from its files, then write summary.json, figures, report.md."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    slo = Slo(meta["slo"]["ttft_s"], meta["slo"]["tpot_s"])
    summaries, drawn = {}, {}
    for run in meta["runs"]:  # one run in memory at a time: a 16-GPU trace run is ~0.5 M requests
        if not (folder / "runs" / run).is_dir():
            continue
        data = rundata.load(folder / "runs" / run)
        summaries[run] = summarize(data, slo, stages=tuple(meta.get("stages", ("prefill", "decode"))),
                                   load_steps=meta.get("load_steps") or None)
        drawn[run] = plots.series(data, slo)
        del data
    (folder / "summary.json").write_text(json.dumps({"meta": meta, "runs": summaries}, indent=2) + "\n")
    figures = [p.name for p in plots.draw_all(drawn, slo, folder)]
    path = folder / "report.md"
    path.write_text(report.render(meta, summaries, figures))
    return path
