"""Resident memory of a process tree over time (Linux /proc), and whether it stays flat."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

FLAT_MIB = 16.0  # growth over a run below this (or below FLAT_FRACTION of the start) counts as flat:
FLAT_FRACTION = 0.03  # allocator arenas and caches settle by a few MiB without being a leak
# Growth is measured between the first and the last fifth of the settled run (means), not from the slope:
# allocators grow in steps (a new high-water mark when the largest batch so far arrives), and a line fitted
# through one step reads as a leak; a leak keeps growing into the last fifth.


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, role) of a live process, or None."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    words = [a.decode(errors="replace") for a in argv if a]
    if "serve" in words and words.index("serve") + 1 < len(words):
        role = words[words.index("serve") + 1]
    elif "up" in words:
        role = "launcher"
    elif "store" in words:
        role = "store"
    elif words and "valkey-server" in words[0]:
        role = "valkey"
    else:
        role = Path(words[0]).name if words else "?"
    return ppid, role


def tree(root: int) -> dict[int, str]:
    """pid -> role of `root` and every descendant."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = info
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in parents:
            found[pid] = parents[pid][1]
            frontier += [p for p, (pp, _) in parents.items() if pp == pid]
    return found


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def slope_per_min(times_s: list[float], values: list[float]) -> float:
    """Least-squares slope, units per minute."""
    if len(times_s) < 2 or max(times_s) == min(times_s):
        return 0.0
    return float(np.polyfit(np.asarray(times_s), np.asarray(values), 1)[0]) * 60.0


def growth_mib(values: list[float]) -> float:
    """Mean of the last fifth minus mean of the first fifth."""
    k = max(1, len(values) // 5)
    return float(np.mean(values[-k:]) - np.mean(values[:k])) if values else 0.0


def is_flat(start_mib: float, growth: float) -> bool:
    return growth <= max(FLAT_MIB, FLAT_FRACTION * start_mib)


class RssSampler:
    """Samples the RSS of every process under `root` every `period_s` on a thread of its own."""

    def __init__(self, root: int, period_s: float):
        self.root = root
        self.period_s = period_s
        self.samples: list[dict] = []  # {"t": s since start, "pid", "role", "rss_mib"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            t = time.monotonic() - self._t0
            for pid, role in tree(self.root).items():
                kib = rss_kib(pid)
                if kib is not None:
                    self.samples.append({"t": round(t, 2), "pid": pid, "role": role, "rss_mib": round(kib / 1024, 2)})
            if self._stop.wait(self.period_s):
                return

    def summary(self, warmup_fraction: float = 0.2) -> list[dict]:
        """Per process: RSS at start/end/max, and the slope after the first `warmup_fraction` of the run."""
        by_pid: dict[int, list[dict]] = {}
        for s in self.samples:
            by_pid.setdefault(s["pid"], []).append(s)
        span = max((s["t"] for s in self.samples), default=0.0)
        rows = []
        for pid, rows_of in sorted(by_pid.items(), key=lambda kv: kv[1][0]["role"]):
            settled = [s for s in rows_of if s["t"] >= warmup_fraction * span] or rows_of
            slope = slope_per_min([s["t"] for s in settled], [s["rss_mib"] for s in settled])
            growth = growth_mib([s["rss_mib"] for s in settled])
            rows.append({
                "pid": pid, "role": rows_of[0]["role"], "samples": len(rows_of),
                "start_mib": rows_of[0]["rss_mib"], "end_mib": rows_of[-1]["rss_mib"],
                "max_mib": max(s["rss_mib"] for s in rows_of), "slope_mib_per_min": round(slope, 3),
                "growth_mib": round(growth, 2), "flat": is_flat(settled[0]["rss_mib"], growth),
            })
        return rows
