"""Who may act: the token rule, and guards against pages of other sites acting for you.

- Bound to a loopback address (the default, 127.0.0.1) the dashboard is reachable only
  from this machine and actions need no token — unless one is set, which is then checked.
- Bound to anything else, actions (every POST) need the token: `--token`, else
  `STREAMFLOW_DASHBOARD_TOKEN`, else one made with `secrets` and printed once at start.
  It comes in the form's `token` field or an `X-Streamflow-Token` (or `Authorization:
  Bearer`) header and is compared with `hmac.compare_digest`. Read pages stay open.
- A POST whose `Origin` is another site is refused (a page elsewhere cannot submit the
  forms for you), and on loopback only loopback `Host` names are served, so a hostile
  domain resolved to 127.0.0.1 (DNS rebinding) cannot read or act.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Host names a loopback-bound dashboard answers to.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    #: The token every action must carry; None: actions need none.
    token: str | None
    #: True when no token was given and this one was made at start (print it once).
    generated: bool = False


def token_policy(host: str, given: str | None) -> TokenPolicy:
    """The rule for a dashboard bound to `host` with `given` (from --token or the
    environment): a given token always counts; off loopback there is always one."""
    if given is not None and given.strip():
        return TokenPolicy(given.strip())
    if is_loopback(host):
        return TokenPolicy(None)
    return TokenPolicy(secrets.token_urlsafe(24), generated=True)


def supplied_token(form: Mapping[str, str], headers: Headers) -> str:
    if form.get("token"):
        return form["token"]
    if headers.get("x-streamflow-token"):
        return headers["x-streamflow-token"]
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def token_ok(expected: str | None, supplied: str) -> bool:
    if expected is None:
        return True
    # Bytes: compare_digest refuses str with non-ASCII characters.
    return hmac.compare_digest(supplied.encode("utf-8"), expected.encode("utf-8"))


def host_name(host_header: str) -> str:
    """ "127.0.0.1:8080" -> "127.0.0.1", "[::1]:8080" -> "::1", "LocalHost" -> "localhost"."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def cross_origin(headers: Headers, scheme: str) -> bool:
    """True when the browser says the request comes from another site's page."""
    if headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = headers.get("origin")
    if origin is None or origin == "null":
        # No Origin: not a browser form post from another page (browsers send one on
        # every cross-origin POST). "null" comes from sandboxed or file pages: refuse it.
        return origin == "null"
    return origin.lower() != f"{scheme}://{headers.get('host', '')}".lower()


class HostGuard:
    """ASGI middleware: answer 400 to a request whose Host is not one of `allowed`."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = host_name(Headers(scope=scope).get("host", ""))
            if host not in self.allowed:
                response = PlainTextResponse(
                    f"this dashboard answers to {', '.join(sorted(self.allowed))} only; "
                    "open it through one of those names",
                    status_code=400,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
