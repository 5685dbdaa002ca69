"""PNG figures of an experiment (matplotlib, headless): latency CDFs, replicas and load over time,
SLO attainment over time. Without matplotlib (`pip install matplotlib`, in the dev extra) no
figure is drawn and the report says so."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.sim.result import RunData, StageSample

from .metrics import Slo, attainment_over_time

CDF_POINTS = 2000


@dataclass
class Series:
    """What the figures need of a run, small enough to keep for every run at once."""

    ttft_s: np.ndarray  # sorted, subsampled
    tpot_s: np.ndarray
    attainment: list[tuple[float, float, int]]
    timeline: list[StageSample]


def _cdf_sample(values: list[float | None], ok: list[bool]) -> np.ndarray:
    kept = np.sort(np.array([v for v, good in zip(values, ok) if good and v is not None], dtype=float))
    if kept.size > CDF_POINTS:  # evenly spaced quantiles draw the same curve
        kept = kept[np.linspace(0, kept.size - 1, CDF_POINTS).astype(int)]
    return kept


def series(data: RunData, slo: Slo) -> Series:
    ok = [s == "ok" for s in data.status]
    return Series(_cdf_sample(data.ttft_s, ok), _cdf_sample(data.tpot_s, ok), attainment_over_time(data, slo),
                  data.timeline)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(runs: dict[str, Series], slo: Slo, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, data in runs.items():
        for ax, values in zip(axes, (data.ttft_s, data.tpot_s)):
            if values.size:
                ax.plot(values * 1000, np.arange(1, values.size + 1) / values.size, label=name)
    for ax, title, limit in zip(axes, ("TTFT", "time per output token"), (slo.ttft_s, slo.tpot_s)):
        ax.axvline(limit * 1000, color="k", linestyle="--", linewidth=0.8, label="SLO")
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replicas_over_time(name: str, data: Series, path: Path) -> Path:
    plt = _pyplot()
    stages = sorted({s.stage for s in data.timeline})
    fig, axes = plt.subplots(len(stages), 1, figsize=(11, 2.8 * max(len(stages), 1)), sharex=True, squeeze=False)
    for ax, stage in zip(axes[:, 0], stages):
        rows = [s for s in data.timeline if s.stage == stage]
        t = np.array([s.time for s in rows]) / 60
        ax.step(t, [s.ready for s in rows], where="post", label="ready")
        ax.step(t, [s.ready + s.starting + s.unplaced for s in rows], where="post", linestyle=":", label="asked")
        ax.set_ylabel(f"{stage} replicas")
        load = ax.twinx()
        load.plot(t, [s.load_tokens_per_s for s in rows], color="gray", alpha=0.5, linewidth=0.8)
        load.set_ylabel("load (tokens/s)", color="gray")
        ax.legend(loc="upper left", fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("minutes")
    fig.suptitle(f"{name}: replicas and load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attainment(runs: dict[str, Series], slo: Slo, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.5))
    for name, data in runs.items():
        rows = data.attainment
        ax.plot([r[0] / 60 for r in rows], [r[1] * 100 for r in rows], label=name, linewidth=1)
    ax.axhline(99, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlabel("minutes (by arrival)")
    ax.set_ylabel("SLO attainment per minute (%)")
    ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(runs: dict[str, Series], slo: Slo, folder: Path) -> list[Path]:
    """Every figure into `folder`; [] without matplotlib."""
    if not available():
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = [latency_cdfs(runs, slo, folder / "latency_cdf.png"), attainment(runs, slo, folder / "slo_attainment.png")]
    paths += [replicas_over_time(name, data, folder / f"replicas_{name}.png") for name, data in runs.items()]
    return paths
