"""One structured line per lifecycle event.

Processes log JSON objects, one per line, to stderr: easy to grep, easy to ship. Library
code calls `log_event`; only the CLI installs the formatter.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("streamflow")


def log_event(
    event: str, level: int = logging.INFO, *, exc_info: bool = False, **fields: Any
) -> None:
    """Log `event` (dotted, e.g. "worker.step_started") with bounded key/value fields.

    `exc_info=True` attaches the exception being handled, as with `logging`.
    """
    logger.log(level, event, exc_info=exc_info, extra={"sf_fields": fields})


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        line.update(getattr(record, "sf_fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: int = logging.INFO) -> None:
    """Send Streamflow's log lines to stderr as JSON (called once, by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger("streamflow")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
