"""structlog JSON logs, one object per line, bound to the job id; and the job's place among Ray's own output."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def configure(job_id: str) -> structlog.stdlib.BoundLogger:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger("nota").bind(job_id=job_id)


def _stderr_logger(*args: Any) -> structlog.PrintLogger:
    """A logger printing to `sys.stderr` as it is when a logger is made, not as it was when logging was configured:
    a stream swapped in meanwhile (a test's captured output, since closed) must not swallow later lines."""
    return structlog.PrintLogger(sys.stderr)


def headline(text: str, stream: TextIO) -> None:
    """A line that stands out among Ray's: set apart by a blank line and rules, bold on a terminal."""
    bold, plain = ("\033[1m", "\033[0m") if stream.isatty() else ("", "")
    print(f"\n{bold}==== {text} ===={plain}", file=stream, flush=True)


def ray_data_warnings_to_file() -> None:
    """Ray Data logs every record to ray-data.log in the Ray session's logs (it names the folder as each dataset
    starts) and INFO and up to the terminal too; keep its progress and errors there, its warnings in the file."""
    import ray.data  # noqa: F401 - importing it sets up the "ray.data" handlers

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the terminal; the file handler is no StreamHandler
            handler.addFilter(_not_a_warning)


def _not_a_warning(record: logging.LogRecord) -> bool:
    return record.levelno != logging.WARNING
