"""Redis Cluster URLs: `redis+cluster://host:port[,host:port...]` (or `rediss+cluster://`).

A separate scheme rather than a `?cluster=1` flag on `redis://`: the two need different
clients (redis-py's `RedisCluster` routes every key to the shard owning its slot), and a
scheme cannot be dropped by a tool that rewrites query strings. Several seed nodes may be
listed, comma-separated; the client discovers the rest with CLUSTER SLOTS. A cluster has
only database 0, so a path other than `/` or `/0` is refused, as are query options (the
engine sets timeouts and retries itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def parse_cluster_url(url: str) -> ClusterUrl:
    """The seed nodes and credentials of a cluster URL; ValueError says what is wrong."""
    if not is_cluster_url(url):
        raise ValueError(f"not a Redis Cluster URL (want redis+cluster://host:port): {url!r}")
    ssl = url.startswith("rediss+")
    rest = url.split("://", 1)[1]
    if "?" in rest or "#" in rest:
        raise ValueError("a Redis Cluster URL takes no query options or fragment")
    netloc, slash, path = rest.partition("/")
    if slash and path not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, got /{path}")
    username = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, colon, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # redis://secret@host is the password, as redis-py reads it
            username, password = None, unquote(user)
    nodes = tuple(_node(part) for part in netloc.split(","))
    return ClusterUrl(nodes, username, password, ssl)


def _node(text: str) -> tuple[str, int]:
    text = text.strip()
    if not text:
        raise ValueError("a Redis Cluster URL needs at least one host:port")
    if text.startswith("["):  # [::1]:7000
        host, _, port_text = text[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    try:
        port = int(port_text) if port_text else 6379
    except ValueError:
        raise ValueError(f"not a port number in {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port
