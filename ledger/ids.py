"""Workflow ids: opaque strings that sort by creation time (48-bit ms clock + 80 random bits)."""

from __future__ import annotations

import os
import time


def new_workflow_id() -> str:
    millis = time.time_ns() // 1_000_000
    return f"{millis:012x}{os.urandom(10).hex()}"
