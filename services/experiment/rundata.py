"""A run's RunData on disk, in one folder, and back (what `experiment report DIR` reads).

    records.csv.gz   one row per request: arrival_s, prompt_tokens, output_tokens, status,
                     ttft_s, e2e_s, tpot_s, queue_s, prefill_s (empty: unknown)
    itl.csv.gz       weighted inter-token gap samples: seconds, weight
    timeline.csv     one row per stage per poll (StageSample fields)
    changes.csv      scale changes: time, stage, from, to
    run.json         duration_s, share_seconds, gpu_seconds_occupied, share_seconds_by_stage, stats
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import asdict, fields
from pathlib import Path

from services.sim.result import RunData, ScaleChange, StageSample

REQUEST_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens", "status", "ttft_s", "e2e_s", "tpot_s",
                   "queue_s", "prefill_s")


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def save(data: RunData, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "records.csv.gz", "wt", newline="", compresslevel=3) as f:
        w = csv.writer(f)
        w.writerow(REQUEST_COLUMNS)
        cols = [getattr(data, c) for c in REQUEST_COLUMNS]
        w.writerows([_fmt(v) for v in row] for row in zip(*cols))
    with gzip.open(folder / "itl.csv.gz", "wt", newline="", compresslevel=3) as f:
        w = csv.writer(f)
        w.writerow(("seconds", "weight"))
        w.writerows((f"{v:.6f}", _fmt(wt)) for v, wt in zip(data.itl_values, data.itl_weights))
    with open(folder / "timeline.csv", "w", newline="") as f:
        names = [x.name for x in fields(StageSample)]
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(asdict(s) for s in data.timeline)
    with open(folder / "changes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("time", "stage", "from", "to"))
        w.writerows((c.time, c.stage, c.from_replicas, c.to_replicas) for c in data.changes)
    meta = {"duration_s": data.duration_s, "share_seconds": data.share_seconds,
            "gpu_seconds_occupied": data.gpu_seconds_occupied,
            "share_seconds_by_stage": data.share_seconds_by_stage, "stats": data.stats}
    (folder / "run.json").write_text(json.dumps(meta, indent=2) + "\n")


def _num(text: str, kind=float):
    return None if text == "" else kind(text)


def load(folder: str | Path) -> RunData:
    folder = Path(folder)
    data = RunData()
    with gzip.open(folder / "records.csv.gz", "rt", newline="") as f:
        for row in csv.DictReader(f):
            data.arrival_s.append(float(row["arrival_s"]))
            data.prompt_tokens.append(int(row["prompt_tokens"]))
            data.output_tokens.append(int(row["output_tokens"]))
            data.status.append(row["status"])
            for name in ("ttft_s", "e2e_s", "tpot_s", "queue_s", "prefill_s"):
                getattr(data, name).append(_num(row[name]))
    with gzip.open(folder / "itl.csv.gz", "rt", newline="") as f:
        for row in csv.DictReader(f):
            data.itl_values.append(float(row["seconds"]))
            data.itl_weights.append(float(row["weight"]))
    kinds = {x.name: x.type for x in fields(StageSample)}
    with open(folder / "timeline.csv", newline="") as f:
        for row in csv.DictReader(f):
            values = {k: (v if kinds[k] == "str" else int(v) if kinds[k] == "int" else float(v)) for k, v in row.items()}
            data.timeline.append(StageSample(**values))
    with open(folder / "changes.csv", newline="") as f:
        for row in csv.DictReader(f):
            data.changes.append(ScaleChange(float(row["time"]), row["stage"], int(row["from"]), int(row["to"])))
    meta = json.loads((folder / "run.json").read_text())
    data.duration_s, data.share_seconds = meta["duration_s"], meta["share_seconds"]
    data.gpu_seconds_occupied, data.stats = meta["gpu_seconds_occupied"], meta.get("stats", {})
    data.share_seconds_by_stage = meta.get("share_seconds_by_stage", {})
    return data
