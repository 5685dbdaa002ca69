"""Structured logs: JSON lines in services (ELASTUNE_LOG_FORMAT=json), readable text otherwise."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(service: str, fmt: str | None = None, level: str | None = None) -> None:
    fmt = fmt or os.environ.get("ELASTUNE_LOG_FORMAT", "text")
    level_no = getattr(logging, (level or os.environ.get("ELASTUNE_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
