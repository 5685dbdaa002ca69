"""What every benchmark's JSON records about where it ran: machine and commit."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from pathlib import Path


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def write_json(path: str | Path, data: dict) -> Path:
    """Write a benchmark's result as indented JSON (making its folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path
