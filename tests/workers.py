"""Worker classes the tests build workflows from."""

from __future__ import annotations

from typing import Any

from streamflow import Worker


class Noop(Worker):
    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return None


class Emails(Worker):
    queue = "emails"
    max_attempts = 5
    priority = 3

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        return {"sent": True}
