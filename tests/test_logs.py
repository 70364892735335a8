"""jobs.logs: JSON lines on the stderr of the moment."""

import io
import json
import sys

import structlog

from jobs import logs


def test_lines_go_to_the_stderr_of_the_moment_not_the_one_logging_was_configured_with(monkeypatch):
    configured_with, now = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", configured_with)
    logs.configure("job-1")
    configured_with.close()  # as a test's captured output is, once the test ends
    monkeypatch.setattr(sys, "stderr", now)
    structlog.get_logger("nota").warning("later", model="tiny")
    assert json.loads(now.getvalue())["event"] == "later"
