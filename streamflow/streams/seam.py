"""Where a stream transport may be wrapped from outside the engine: chaos mode.

The chaos suite (`chaos/`) starts real worker and consumer processes with
`STREAMFLOW_CHAOS` set to a fault plan; their transports are wrapped so messages are
dropped, duplicated, delayed or replayed on the way into Redis. Nothing else in the
engine knows about it, and without the variable this returns the transport untouched.
"""

from __future__ import annotations

import importlib

from streamflow.streams.transport import StreamTransport

#: The environment variable holding a chaos fault plan (JSON); see chaos/faults.py.
CHAOS_ENV = "STREAMFLOW_CHAOS"


def wrap_for_chaos(transport: StreamTransport, plan: str | None) -> StreamTransport:
    if not plan:
        return transport
    # Imported only in chaos mode: production processes never load the fault injector.
    faults = importlib.import_module("chaos.faults")
    wrapped: StreamTransport = faults.FaultyTransport.from_plan(transport, plan)
    return wrapped
