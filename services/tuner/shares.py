"""How a process gets a share of a device, and how a pod finds out which share it has.

A share is a fraction in (0, 1]:
- CPU: threads / cores; a process at that share runs `threads` torch threads pinned to as many
  cores (os.sched_setaffinity), so two processes at 0.5 do not fight over the same cores;
- GPU under CUDA MPS: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE / 100, read by the CUDA driver when the
  process creates its context, so one process per share (the profiler starts one per share);
- GPU under MIG: the slice's compute fraction, e.g. a 3g.40gb profile is 3/7 of an H100.

The profiler and the sidecar use the same code: `ShareMechanism.child_env()` is what a process
at a share is started with, `apply_in_process()` what it does first, `detect_share()` what a
sidecar reads back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

MPS_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
MIG_ENV = "ELASTUNE_MIG_PROFILE"  # e.g. "3g.40gb", set by the gpu-mig overlay
THREADS_ENV = "ELASTUNE_THREADS"
SHARE_ENV = "ELASTUNE_GPU_SHARE"
MIG_SLICES = 7  # compute slices of an A100/H100
_MIG = re.compile(r"^(\d)g\.\d+gb$")


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class ShareMechanism:
    """`cpu` (threads + affinity over `cores`) or `mps` (active-thread percentage)."""

    kind: str
    cores: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "mps"):
            raise ValueError(f"share mechanism must be cpu or mps, got {self.kind!r}")
        if self.kind == "cpu" and not self.cores:
            raise ValueError("the cpu share mechanism needs at least one core")

    @staticmethod
    def for_device(device: str) -> ShareMechanism:
        if device.startswith("cuda"):
            return ShareMechanism("mps")
        return ShareMechanism("cpu", tuple(usable_cores()))

    def grid(self, step: float = 0.1) -> list[float]:
        """The shares this mechanism can give: every thread count on CPU; MPS percentages on a
        `step` grid (MPS accepts any integer percentage; finer steps cost profiling time)."""
        if self.kind == "cpu":
            n = len(self.cores)
            return [round(k / n, 6) for k in range(1, n + 1)]
        count = max(1, round(1.0 / step))
        return [round(k / count, 6) for k in range(1, count + 1)]

    def threads(self, share: float) -> int:
        return max(1, round(share * len(self.cores))) if self.kind == "cpu" else 0

    def child_env(self, share: float) -> dict[str, str]:
        """Environment of a process that should run at `share`."""
        if self.kind == "mps":
            return {MPS_ENV: str(max(1, round(share * 100))), SHARE_ENV: f"{share:g}"}
        return {THREADS_ENV: str(self.threads(share)), SHARE_ENV: f"{share:g}"}

    def apply_in_process(self, share: float) -> None:
        """What the process at `share` does before loading the model (CPU only: MPS is applied
        by the driver from the environment, which must be set before CUDA starts)."""
        if self.kind != "cpu":
            return
        import torch

        n = self.threads(share)
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(self.cores[:n]))
        torch.set_num_threads(n)


def detect_share(env: Mapping[str, str], reported: float | None = None, cores: int | None = None) -> float:
    """The pod's share: MPS percentage, else MIG profile, else an explicit ELASTUNE_GPU_SHARE,
    else the worker's own report, else CPU threads / cores, else 1."""
    if env.get(MPS_ENV):
        pct = float(env[MPS_ENV])
        if not 0 < pct <= 100:
            raise ValueError(f"{MPS_ENV}={env[MPS_ENV]!r} must be in (0, 100]")
        return pct / 100.0
    if env.get(MIG_ENV):
        m = _MIG.match(env[MIG_ENV])
        if not m:
            raise ValueError(f"{MIG_ENV}={env[MIG_ENV]!r} is not a MIG profile like 3g.40gb")
        return int(m.group(1)) / MIG_SLICES
    if env.get(SHARE_ENV):
        return float(env[SHARE_ENV])
    if reported:
        return reported
    if env.get(THREADS_ENV) and int(env[THREADS_ENV]) > 0:
        total = cores or len(usable_cores())
        return min(1.0, int(env[THREADS_ENV]) / total)
    return 1.0


class MpsDaemon:
    """Starts the MPS control daemon for the profiler when it runs as root and none is up;
    stops only a daemon it started. Without root, a running daemon is used as it is."""

    def __init__(self) -> None:
        self.started = False

    @staticmethod
    def running() -> bool:
        control = shutil.which("nvidia-cuda-mps-control")
        if control is None:
            return False
        probe = subprocess.run([control], input="get_server_list\n", capture_output=True, text=True, timeout=10)
        return probe.returncode == 0

    def __enter__(self) -> MpsDaemon:
        if self.running():
            return self
        control = shutil.which("nvidia-cuda-mps-control")
        if control is None or os.geteuid() != 0:
            raise RuntimeError(
                "GPU shares need the CUDA MPS daemon: start it (nvidia-cuda-mps-control -d) or run the profiler as root"
            )
        subprocess.run([control, "-d"], check=True, timeout=30)
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            subprocess.run([shutil.which("nvidia-cuda-mps-control") or "nvidia-cuda-mps-control"],
                           input="quit\n", text=True, timeout=30)
