"""GPUs and the pods placed on them: share packing and GPU-second accounting. Pure.

A pod asks for a fraction of one GPU (its share: MPS active threads or a MIG slice). It is
placed best-fit (on the GPU with the least room that still fits it, so small pods fill partly
used GPUs before opening empty ones); with no room anywhere it stays unplaced (Pending) until a
pod leaves. Two figures are integrated over time: allocated share (GPU-seconds in the sense of
replica-seconds x share) and occupied GPUs (a GPU with any pod on it counts whole); the allocated
share is also integrated per stage (where the GPU-seconds go).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .pods import Pod

_EPS = 1e-9


@dataclass
class Cluster:
    gpus: int
    free: list[float] = field(default_factory=list)
    pods_on: list[int] = field(default_factory=list)
    unplaced: list[Pod] = field(default_factory=list)  # FIFO of pods waiting for room
    share_seconds: float = 0.0
    gpu_seconds_occupied: float = 0.0
    share_seconds_by_stage: dict[str, float] = field(default_factory=dict)
    _stage_share: dict[str, float] = field(default_factory=dict)  # placed share per stage now
    _last: float = 0.0

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError("a cluster needs at least one GPU")
        self.free = [1.0] * self.gpus
        self.pods_on = [0] * self.gpus

    def account(self, now: float) -> None:
        """Integrate allocated share and occupied GPUs up to `now`."""
        dt = now - self._last
        if dt > 0:
            self.share_seconds += dt * (self.gpus - sum(self.free))
            self.gpu_seconds_occupied += dt * sum(1 for n in self.pods_on if n)
            by = self.share_seconds_by_stage
            for stage, share in self._stage_share.items():
                by[stage] = by.get(stage, 0.0) + dt * share
            self._last = now

    def allocated(self) -> float:
        return self.gpus - sum(self.free)

    def occupied(self) -> int:
        return sum(1 for n in self.pods_on if n)

    def place(self, pod: Pod, now: float) -> bool:
        self.account(now)
        fits = [(self.free[g], g) for g in range(self.gpus) if self.free[g] + _EPS >= pod.share]
        if not fits:
            if pod not in self.unplaced:
                self.unplaced.append(pod)
            return False
        _, gpu = min(fits)
        self.free[gpu] -= pod.share
        self.pods_on[gpu] += 1
        self._stage_share[pod.stage] = self._stage_share.get(pod.stage, 0.0) + pod.share
        pod.gpu = gpu
        return True

    def remove(self, pod: Pod, now: float) -> list[Pod]:
        """Free the pod's share; returns the waiting pods that were placed in the room it left."""
        self.account(now)
        if pod.gpu is None:
            if pod in self.unplaced:
                self.unplaced.remove(pod)
            return []
        self.free[pod.gpu] = min(self.free[pod.gpu] + pod.share, 1.0)
        self.pods_on[pod.gpu] -= 1
        self._stage_share[pod.stage] -= pod.share
        pod.gpu = None
        placed = [p for p in list(self.unplaced) if self.place(p, now)]
        self.unplaced = [p for p in self.unplaced if p.gpu is None]
        return placed
