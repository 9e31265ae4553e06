"""Fault plans, and the stream transport that carries them out inside engine processes.

A chaos run starts real `streamflow` processes with `STREAMFLOW_CHAOS` set to a
`FaultPlan` as JSON; `streamflow.streams.seam` then wraps each process's transport in a
`FaultyTransport`. The engine does not know: it publishes, and the wrapper decides each
message's fate on the way into Redis.

Fates, drawn per published message of a stream kind the plan names (`completion`,
`ready`), exclusive and in this order of the cumulative draw:

- `drop`      — never sent; the caller is told it was (a fake entry id comes back);
- `duplicate` — sent twice, back to back;
- `delay`     — withheld, then sent from a background thread after `delay_ms`;
- `replay`    — sent now, and the same fields sent again `replay_after_ms` later;
- otherwise the message passes untouched.

On the read side, `reorder` shuffles a batch of two or more entries before the engine
sees it.

A plan may also `script` fates for particular messages, to replay one failure exactly:
`{"ready:flaky#2": "drop"}` drops the second ready message for a step named `flaky` this
process publishes (`completion:<step>#<n>` for completion events). Scripted messages still
take their random draws, so the rest of the sequence does not shift.

Every fault is appended to the plan's log file as one JSON line (a single `os.write` on
an `O_APPEND` descriptor, so lines from many processes never interleave) carrying the
fault's kind and phase, the stream kind and key, the message's identity (a completion
event's `key`; a ready message's `workflow_id` and `step`), the time and the pid. A fault
is logged only once it took effect: a duplicate after both XADDs returned, a drop after
the rest of its batch went out (if the batch failed, the engine hands every message back
itself and nothing was really dropped). Delays and replays log twice: `delay` is logged
`injected` when withheld and `released` when finally sent; `replay` is logged `scheduled`
when chosen and `injected` when the copy is sent. A delayed message whose process died
before releasing it was, in effect, dropped; a replay never sent did not happen.

Decisions come from `random.Random` streams seeded with the plan's seed and the process
label (one stream per stream kind, one for reads), so a process draws the same sequence
of fates every time a seed is replayed. Which message meets which draw still depends on
the order the process publishes in, which concurrency may change.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from streamflow.streams.transport import (
    ClaimResult,
    Entry,
    Fields,
    PendingSummary,
    StreamTransport,
)

#: The stream kinds a plan may name.
STREAM_KINDS = ("completion", "ready")
#: The publish-side fates, in the order their probabilities are stacked.
PUBLISH_FAULTS = ("drop", "duplicate", "delay", "replay")
#: Every fault kind a log line can carry.
FAULT_KINDS = (*PUBLISH_FAULTS, "reorder")

#: How long a delayed or replayed message keeps trying to reach a Redis that is down.
RELEASE_RETRY_SECONDS = 120.0


class FaultPlanError(ValueError):
    """A fault plan that cannot be carried out (bad JSON, unknown stream, bad rate)."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What to inject, where, and where to write it down."""

    #: The run's seed; each process combines it with its `label`.
    seed: int
    #: The fault log (JSON lines), shared by every process of the run.
    log: str
    #: This process's name within the run (e.g. "worker-1"): part of its random seed.
    label: str = "process"
    #: Stream kinds to inject into: "completion" and/or "ready".
    streams: tuple[str, ...] = STREAM_KINDS
    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    replay: float = 0.0
    #: Probability that a read batch of two or more entries is handed over shuffled.
    reorder: float = 0.0
    #: A delayed message is sent after a uniform draw from this range (milliseconds).
    delay_ms: tuple[int, int] = (200, 3000)
    #: A replayed message's copy is sent after a uniform draw from this range.
    replay_after_ms: tuple[int, int] = (500, 4000)
    #: Fates for particular messages: "<stream>:<step>#<n>" -> drop|duplicate|delay|replay
    #: (the n-th message of that stream kind for a step of that name, in this process).
    script: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.streams) - set(STREAM_KINDS))
        if unknown:
            raise FaultPlanError(f"unknown stream kind(s) {unknown}; use {list(STREAM_KINDS)}")
        for name in (*PUBLISH_FAULTS, "reorder"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise FaultPlanError(f"{name} must be between 0 and 1, got {rate}")
        total = sum(getattr(self, name) for name in PUBLISH_FAULTS)
        if total > 1.0 + 1e-9:
            raise FaultPlanError(
                f"drop + duplicate + delay + replay is {total:.2f}; a message has one fate, "
                "so they may add up to 1 at most"
            )
        for name in ("delay_ms", "replay_after_ms"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise FaultPlanError(f"{name} must be a range 0 <= low <= high, got {low, high}")
        for target, fate in self.script.items():
            kind, _, rest = target.partition(":")
            step, _, n = rest.rpartition("#")
            if kind not in STREAM_KINDS or not step or not n.isdigit() or int(n) < 1:
                raise FaultPlanError(f"script target {target!r} is not '<stream>:<step>#<n>'")
            if fate not in PUBLISH_FAULTS:
                raise FaultPlanError(f"script fate {fate!r} for {target!r}: use {PUBLISH_FAULTS}")

    @property
    def injects_anything(self) -> bool:
        rates = bool(self.streams) and any(getattr(self, n) > 0 for n in FAULT_KINDS)
        return rates or bool(self.script)

    def for_process(self, label: str) -> FaultPlan:
        return replace(self, label=label)

    def to_json(self) -> str:
        data = asdict(self)
        data["script"] = dict(self.script)
        data["streams"] = list(self.streams)
        data["delay_ms"] = list(self.delay_ms)
        data["replay_after_ms"] = list(self.replay_after_ms)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FaultPlanError(f"the fault plan is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise FaultPlanError("the fault plan must be a JSON object")
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(data) - known)
        if extra:
            raise FaultPlanError(f"unknown fault plan field(s) {extra}")
        if "seed" not in data or "log" not in data:
            raise FaultPlanError("a fault plan needs at least 'seed' and 'log'")
        for name in ("streams", "delay_ms", "replay_after_ms"):
            if name in data:
                data[name] = tuple(data[name])
        if not isinstance(data.get("script", {}), dict):
            raise FaultPlanError("script must be an object of target -> fate")
        try:
            return cls(**data)
        except TypeError as exc:
            raise FaultPlanError(str(exc)) from None


# -- the fault log ---------------------------------------------------------------------


def stream_kind(stream: str, fields: Fields) -> str | None:
    """The stream kind ("completion", "ready") of an engine message; None for others."""
    kind = fields.get("kind")
    if kind == "completion" and stream.endswith(":completions"):
        return "completion"
    if kind == "ready" and ":ready:" in stream:
        return "ready"
    return None


def identity(kind: str, fields: Fields) -> dict[str, str]:
    """What the invariants match a fault on: a completion's key, a ready's (wf, step)."""
    out = {"workflow_id": fields.get("workflow_id", ""), "step": fields.get("step", "")}
    if kind == "completion":
        out["key"] = fields.get("key", "")
        out["attempt"] = fields.get("attempt", "")
        out["status"] = fields.get("status", "")
    return out


class FaultLog:
    """Appends one JSON line per fault; safe across threads and processes."""

    def __init__(self, path: str, label: str, seed: int) -> None:
        self.path = path
        self.label = label
        self.seed = seed
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def new_id(self) -> str:
        with self._lock:
            return f"{self.label}:{os.getpid()}:{next(self._ids)}"

    def write(self, fault_id: str, kind: str, phase: str, **fields: Any) -> None:
        line = {
            "fault_id": fault_id,
            "kind": kind,
            "phase": phase,
            "t": time.time(),
            "pid": os.getpid(),
            "label": self.label,
            "seed": self.seed,
            **fields,
        }
        os.write(self._fd, (json.dumps(line, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def read_fault_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every line of a fault log (a missing file is an empty log)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# -- deferred sends --------------------------------------------------------------------


@dataclass(order=True)
class _Deferred:
    due: float
    seq: int
    action: Callable[[], None] = field(compare=False)


class _Scheduler:
    """One daemon thread that runs deferred sends when they fall due."""

    def __init__(self, name: str) -> None:
        self._heap: list[_Deferred] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def at(self, due: float, action: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, _Deferred(due, next(self._seq), action))
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0].due > time.monotonic():
                    timeout = self._heap[0].due - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                item = heapq.heappop(self._heap)
            # Each send runs in its own thread, so one send waiting out a Redis outage
            # does not hold up the others falling due meanwhile.
            threading.Thread(target=item.action, daemon=True, name="chaos-send").start()


# -- the wrapper -----------------------------------------------------------------------


class FaultyTransport:
    """A `StreamTransport` that drops, duplicates, delays, replays and reorders messages
    according to a `FaultPlan`, and logs every fault it injects."""

    def __init__(self, inner: StreamTransport, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.log = FaultLog(plan.log, plan.label, plan.seed)
        self._rngs = {k: random.Random(f"{plan.seed}:{plan.label}:{k}") for k in STREAM_KINDS}
        self._read_rng = random.Random(f"{plan.seed}:{plan.label}:read")
        self._lock = threading.Lock()
        self._scheduler = _Scheduler(f"chaos-{plan.label}")
        self._fake_ids = itertools.count(1)
        #: Messages published so far per "<stream>:<step>", for scripted fates.
        self._seen: dict[str, int] = {}

    @classmethod
    def from_plan(cls, transport: StreamTransport, plan_json: str) -> FaultyTransport:
        """The seam's entry point: `plan_json` is the value of `STREAMFLOW_CHAOS`."""
        return cls(transport, FaultPlan.from_json(plan_json))

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the Protocol (e.g. RedisTransport.client) comes from the real one.
        if name == "inner":  # not set yet: __init__ failed early
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- deciding ------------------------------------------------------------------------

    def _fate(self, kind: str | None, step: str) -> tuple[str, float]:
        """The fate of one message of `kind` for `step`, and the delay (s) for delay/replay."""
        if kind is None:
            return "pass", 0.0
        plan = self.plan
        with self._lock:
            target = f"{kind}:{step}"
            self._seen[target] = self._seen.get(target, 0) + 1
            scripted = plan.script.get(f"{target}#{self._seen[target]}")
            if kind not in plan.streams and scripted is None:
                return "pass", 0.0
            rng = self._rngs[kind]
            draw = rng.random()
            # The second draw is taken every time, so a fate's delay never shifts the
            # sequence of fates that follow.
            spread = rng.random()
        chosen = scripted
        if chosen is None and kind in plan.streams:
            edge = 0.0
            for name in PUBLISH_FAULTS:
                edge += getattr(plan, name)
                if draw < edge:
                    chosen = name
                    break
        if chosen is None:
            return "pass", 0.0
        low, high = plan.replay_after_ms if chosen == "replay" else plan.delay_ms
        return chosen, (low + (high - low) * spread) / 1000

    def _fake_id(self) -> str:
        return f"0-{next(self._fake_ids)}"

    # -- publishing ------------------------------------------------------------------------

    def add(self, stream: str, fields: Fields) -> str:
        return self.add_many([(stream, fields)])[0]

    def add_many(self, items: Sequence[tuple[str, Fields]]) -> list[str]:
        if not items:
            return []
        fates = [self._fate(stream_kind(s, f), f.get("step", "")) for s, f in items]
        to_send: list[tuple[str, Fields]] = []
        positions: list[int | None] = []
        for (stream, fields), (fate, _) in zip(items, fates, strict=True):
            if fate in ("drop", "delay"):
                positions.append(None)
                continue
            positions.append(len(to_send))
            to_send.append((stream, fields))
            if fate == "duplicate":
                to_send.append((stream, fields))
        sent = self.inner.add_many(to_send) if to_send else []
        # Everything went out: only now are the faults real.
        ids: list[str] = []
        for (stream, fields), (fate, wait), pos in zip(items, fates, positions, strict=True):
            ids.append(sent[pos] if pos is not None else self._fake_id())
            if fate == "pass":
                continue
            kind = stream_kind(stream, fields)
            assert kind is not None
            fault_id = self.log.new_id()
            common = {"stream": kind, "stream_key": stream, **identity(kind, fields)}
            if fate == "drop":
                self.log.write(fault_id, "drop", "injected", **common)
            elif fate == "duplicate":
                assert pos is not None
                self.log.write(
                    fault_id, "duplicate", "injected", entry_ids=sent[pos : pos + 2], **common
                )
            elif fate == "delay":
                self.log.write(fault_id, "delay", "injected", delay_s=round(wait, 3), **common)
                self._defer(fault_id, "delay", "released", wait, stream, fields, common)
            else:
                assert pos is not None
                self.log.write(
                    fault_id,
                    "replay",
                    "scheduled",
                    after_s=round(wait, 3),
                    original_entry_id=sent[pos],
                    **common,
                )
                self._defer(fault_id, "replay", "injected", wait, stream, fields, common)
        return ids

    def _defer(
        self,
        fault_id: str,
        kind: str,
        phase: str,
        wait: float,
        stream: str,
        fields: Fields,
        common: dict[str, Any],
    ) -> None:
        copy = dict(fields)

        def send() -> None:
            deadline = time.monotonic() + RELEASE_RETRY_SECONDS
            pause = 0.05
            while True:
                try:
                    entry_id = self.inner.add(stream, copy)
                except Exception as exc:  # Redis down or restarting: try again, bounded.
                    if time.monotonic() > deadline:
                        self.log.write(fault_id, kind, "lost", error=repr(exc)[:200], **common)
                        return
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                self.log.write(fault_id, kind, phase, entry_id=entry_id, **common)
                return

        self._scheduler.at(time.monotonic() + wait, send)

    # -- reading ---------------------------------------------------------------------------

    def read_group(
        self, group: str, consumer: str, streams: Sequence[str], count: int, block_ms: int
    ) -> list[Entry]:
        entries = self.inner.read_group(group, consumer, streams, count, block_ms)
        if self.plan.reorder <= 0 or len(entries) < 2:
            return entries
        kinds = [stream_kind(e.stream, e.fields) for e in entries]
        if any(k is None or k not in self.plan.streams for k in kinds):
            return entries
        with self._lock:
            if self._read_rng.random() >= self.plan.reorder:
                return entries
            order = list(range(len(entries)))
            self._read_rng.shuffle(order)
        if order == sorted(order):
            order = order[1:] + order[:1]  # a shuffle that changed nothing is no fault
        batch = self.log.new_id()
        for new_pos, old_pos in enumerate(order):
            entry = entries[old_pos]
            kind = kinds[old_pos]
            assert kind is not None
            if new_pos == old_pos:
                continue
            self.log.write(
                f"{batch}:{old_pos}",
                "reorder",
                "injected",
                stream=kind,
                stream_key=entry.stream,
                entry_id=entry.id,
                position=old_pos,
                delivered_at=new_pos,
                **identity(kind, entry.fields),
            )
        return [entries[i] for i in order]

    # -- everything else passes straight through -------------------------------------------

    def ensure_group(self, stream: str, group: str, start_id: str = "0") -> bool:
        return self.inner.ensure_group(stream, group, start_id)

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        return self.inner.ack(stream, group, ids)

    def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> ClaimResult:
        return self.inner.autoclaim(stream, group, consumer, min_idle_ms, count)

    def pending_summary(self, stream: str, group: str) -> PendingSummary:
        return self.inner.pending_summary(stream, group)

    def trim_acknowledged(self, stream: str, groups: Sequence[str]) -> int:
        return self.inner.trim_acknowledged(stream, groups)

    def dead_letter(
        self, entry: Entry, group: str, dead_stream: str, reason: str, deliveries: int
    ) -> str:
        return self.inner.dead_letter(entry, group, dead_stream, reason, deliveries)

    def stream_length(self, stream: str) -> int:
        return self.inner.stream_length(stream)

    def ping(self) -> None:
        self.inner.ping()

    def claim_marker(self, key: str, value: str) -> bool:
        return self.inner.claim_marker(key, value)
