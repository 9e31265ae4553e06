"""Redis Streams: key names, message encoding, the transport seam and the publisher."""

from streamflow.streams.codec import (
    CompletionEvent,
    MalformedEntry,
    Message,
    ReadyMessage,
    decode,
    decode_completion,
    decode_ready,
    encode,
    encode_completion,
    encode_ready,
)
from streamflow.streams.keys import COMPLETION_GROUP, DEFAULT_PREFIX, WORKERS_GROUP, StreamKeys
from streamflow.streams.publisher import Publisher
from streamflow.streams.transport import (
    ClaimedEntry,
    ClaimResult,
    Entry,
    Fields,
    PendingSummary,
    RedisTransport,
    StreamTransport,
    connect,
)

__all__ = [
    "COMPLETION_GROUP",
    "DEFAULT_PREFIX",
    "WORKERS_GROUP",
    "ClaimResult",
    "ClaimedEntry",
    "CompletionEvent",
    "Entry",
    "Fields",
    "MalformedEntry",
    "Message",
    "PendingSummary",
    "Publisher",
    "ReadyMessage",
    "RedisTransport",
    "StreamKeys",
    "StreamTransport",
    "connect",
    "decode",
    "decode_completion",
    "decode_ready",
    "encode",
    "encode_completion",
    "encode_ready",
]
