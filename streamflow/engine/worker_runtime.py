"""The worker: reads ready streams, claims steps in the ledger, runs them, records outcomes.

At most once per attempt: a step runs only after the conditional claim
(`available` -> `executing`) committed, so a duplicate ready message finds it executing
and is acknowledged and recorded, never run. The ready entry is acknowledged once the
claim committed: from then on the ledger (the step's lease) is what keeps the work safe,
and an expired lease is rescued by the maintenance loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine

from ledger.claims import Claim, ClaimRefused, claim_read_ahead
from ledger.db import locked_with_reads
from ledger.errors import InvalidCompletionError, LedgerError
from ledger.jobs import claim_job, complete_job, release_job_claim, renew_job_lease
from ledger.model import STEP_JOB, CompletionResult, ReadyStep
from ledger.rules import CompletionStatus
from ledger.transitions import outcome_read_ahead, unmark_dispatched
from streamflow import telemetry
from streamflow.engine.common import in_transaction, now_ms, ready_messages, utcnow
from streamflow.engine.context import Cancel, StepContext
from streamflow.engine.deadletter import dead_letter
from streamflow.engine.group_commit import GroupCommitter
from streamflow.engine.loader import WorkerNotFoundError, load_worker
from streamflow.engine.retrying import is_transient, retrying
from streamflow.logs import log_event
from streamflow.streams.codec import CompletionEvent, MalformedEntry, decode_ready
from streamflow.streams.keys import StreamKeys
from streamflow.streams.outbox import Ack, StreamOutbox
from streamflow.streams.publisher import Publisher
from streamflow.streams.transport import Entry, StreamTransport

_TRACEBACK_CHARS = 4000


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    queues: tuple[str, ...]
    name: str
    #: Steps performing at once (the user's code running).
    concurrency: int = 8
    #: Steps held at once: claimed, performing or being recorded (None: 4 x concurrency).
    #: Above `concurrency`, a step's claim and its outcome's commit overlap other steps'
    #: work instead of holding a slot; the price is that a claimed step may wait here
    #: for a slot (its lease renewed) while another worker is idle.
    in_flight: int | None = None
    #: How long a claim holds before the maintenance loop may rescue the step.
    lease_seconds: float = 30.0
    #: XREADGROUP BLOCK; also how quickly a stop request is noticed.
    block_ms: int = 500
    #: Ready entries another worker read but never claimed are taken over after this.
    claim_idle_ms: int = 30_000
    #: On SIGTERM: how long in-flight steps may finish before their claims are released.
    drain_seconds: float = 30.0
    #: A ready entry delivered more often than this is dead-lettered, not retried forever.
    max_deliveries: int = 5
    #: Claim a released child of a served queue in the parent's outcome transaction and
    #: run it next on the same thread (see `WorkerRuntime._record`). Off: every child goes
    #: through its ready stream, strictly in stream order.
    hand_off: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.in_flight is not None and self.in_flight < self.concurrency:
            raise ValueError(
                f"in_flight ({self.in_flight}) must be at least concurrency ({self.concurrency})"
            )

    @property
    def held(self) -> int:
        """How many steps the worker holds at once (`in_flight`, or its default)."""
        return self.in_flight if self.in_flight is not None else 4 * self.concurrency


@dataclass
class _Running:
    claim: Claim
    context: StepContext
    done: threading.Event = field(default_factory=threading.Event)
    #: How long `perform` took (telemetry's step duration_ms).
    perform_ms: float | None = None


#: An outcome as recorded: the ledger's answer, the child handed off to this thread (if
#: any) and the released steps to publish.
_Recorded = tuple[CompletionResult, Claim | None, list[ReadyStep]]


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    cancelled: int = 0
    duplicates: int = 0
    released_on_drain: int = 0
    #: Steps claimed by their parent's outcome and run on the same thread (no ready message).
    handed_off: int = 0


class WorkerRuntime:
    def __init__(
        self,
        engine: Engine,
        transport: StreamTransport,
        keys: StreamKeys,
        config: WorkerConfig,
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.keys = keys
        self.config = config
        self.publisher = Publisher(transport, keys)
        # Completion events and acknowledgements leave on a thread of their own: a step
        # thread never waits on Redis for them (see `streamflow.streams.outbox`).
        self.outbox = StreamOutbox(self.publisher)
        # Claims and outcomes of steps running at the same moment share commits, and a
        # group locks all its workflows with one statement.
        self.ledger = GroupCommitter(engine, scope=locked_with_reads)
        self.streams = keys.ready_streams(list(config.queues))
        self.stats = WorkerStats()
        self._running: dict[tuple[str, str, str], _Running] = {}
        self._lock = threading.Lock()
        #: One per step held (read, claimed, performing or being recorded).
        self._slots = threading.Semaphore(config.held)
        #: One per step performing.
        self._performing = threading.Semaphore(config.concurrency)
        self._idle = threading.Condition(self._lock)
        self._handlers = 0
        self._drained = threading.Event()
        #: Set once the worker stops taking work (SIGTERM): no more hand-offs either.
        self._stopping = threading.Event()
        #: Ready entries for the step threads; None tells one of them to end.
        self._entries: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()

    # -- the read loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        cfg = self.config
        for stream in self.streams:
            retrying(partial(self.transport.ensure_group, stream, self.keys.workers_group))
        log_event(
            "worker.started", worker=cfg.name, queues=list(cfg.queues), concurrency=cfg.concurrency
        )
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(stop,), daemon=True, name=f"{cfg.name}-heartbeat"
        )
        heartbeat.start()
        self.outbox.start()
        self._start_step_threads()
        next_takeover = 0.0
        while not stop.is_set():
            if not self._slots.acquire(timeout=cfg.block_ms / 1000):
                continue
            free = 1 + self._drain_free_slots()
            try:
                entries: list[Entry] = []
                now = utcnow().timestamp()
                if now >= next_takeover:
                    entries = self._take_over_idle(free)
                    next_takeover = now + cfg.claim_idle_ms / 2000
                if not entries:
                    entries = self.transport.read_group(
                        self.keys.workers_group, cfg.name, self.streams, free, cfg.block_ms
                    )
            except Exception as exc:
                self._release_slots(free)
                if not is_transient(exc):
                    raise
                log_event(
                    "worker.stream_unavailable",
                    logging.WARNING,
                    worker=cfg.name,
                    error=str(exc)[:200],
                )
                stop.wait(1.0)
                continue
            self._release_slots(free - len(entries))
            for entry in entries:
                self._start_handler(entry)
        self._stopping.set()
        self._drain()
        for _ in range(cfg.held):
            self._entries.put(None)
        self.outbox.close()
        grouped = self.ledger.stats
        log_event(
            "worker.stopped",
            worker=cfg.name,
            **vars(self.stats),
            ledger_operations=grouped.operations,
            ledger_commits=grouped.commits,
        )

    def _drain_free_slots(self) -> int:
        """Take every other free slot too, so one XREADGROUP can fill them all."""
        taken = 0
        while taken < self.config.held - 1 and self._slots.acquire(blocking=False):
            taken += 1
        return taken

    def _release_slots(self, n: int) -> None:
        for _ in range(max(0, n)):
            self._slots.release()

    def _take_over_idle(self, count: int) -> list[Entry]:
        """Ready entries read by a worker that died before claiming: take them over. One
        delivered too often is poison and goes to the dead-letter stream instead."""
        entries: list[Entry] = []
        for stream in self.streams:
            result = self.transport.autoclaim(
                stream,
                self.keys.workers_group,
                self.config.name,
                self.config.claim_idle_ms,
                count - len(entries),
            )
            for claimed in result.claimed:
                if claimed.deliveries > self.config.max_deliveries:
                    self._dead_letter(claimed.entry, "delivered too many times", claimed.deliveries)
                else:
                    entries.append(claimed.entry)
            if len(entries) >= count:
                break
        if entries:
            log_event(
                "worker.took_over_idle_entries", worker=self.config.name, entries=len(entries)
            )
        return entries

    def _dead_letter(self, entry: Entry, reason: str, deliveries: int) -> None:
        dead_letter(
            self.engine,
            self.transport,
            self.keys,
            group=self.keys.workers_group,
            entry=entry,
            reason=reason,
            deliveries=deliveries,
            source=f"worker:{self.config.name}",
        )

    def _start_step_threads(self) -> None:
        """One thread per step held (`in_flight`), each taking the next ready entry, so
        an entry read for a free slot finds a free thread (starting a thread per entry
        cost about 0.1 ms of CPU each); `concurrency` of them perform at once. Daemon
        threads: a drain that gives up on a hung `perform` must not keep the process
        alive; the step's claim is released and it runs elsewhere."""
        for n in range(self.config.held):
            threading.Thread(
                target=self._step_thread, daemon=True, name=f"{self.config.name}-step-{n}"
            ).start()

    def _step_thread(self) -> None:
        while (entry := self._entries.get()) is not None:
            self._handle(entry)

    def _start_handler(self, entry: Entry) -> None:
        with self._lock:
            self._handlers += 1
        self._entries.put(entry)

    # -- one ready message ---------------------------------------------------------------

    def _handle(self, entry: Entry) -> None:
        try:
            self._handle_entry(entry)
        except BaseException:
            # Anything unexpected leaves the entry pending: another worker takes it over
            # after claim_idle_ms, and the ledger keeps the step safe meanwhile. Even a
            # step's SystemExit: the step thread must live on to serve its slot.
            log_event(
                "worker.handler_crashed",
                logging.ERROR,
                worker=self.config.name,
                stream=entry.stream,
                entry=entry.id,
                exc_info=True,
            )
        finally:
            self._slots.release()
            with self._lock:
                self._handlers -= 1
                self._idle.notify_all()

    def _handle_entry(self, entry: Entry) -> None:
        try:
            msg = decode_ready(entry.fields)
        except MalformedEntry as exc:
            self._dead_letter(entry, exc.problem, 1)
            return
        cfg = self.config
        now = utcnow()
        # A step's claim goes out with the group's lock (made with this very `now`).
        hint = (
            claim_read_ahead(msg.workflow_id, msg.step, cfg.name, cfg.lease_seconds, now)
            if msg.job == STEP_JOB
            else None
        )
        try:
            claim = self.ledger.run(
                lambda conn: claim_job(
                    conn,
                    msg.job,
                    msg.workflow_id,
                    msg.step,
                    owner=cfg.name,
                    lease_seconds=cfg.lease_seconds,
                    now=now,
                    message_at=datetime.fromtimestamp(msg.at_ms / 1000, UTC),
                ),
                order_key=msg.workflow_id,
                hint=hint,
            )
        except LedgerError as exc:
            self._ack(entry)
            log_event(
                "worker.ready_unmatched",
                logging.WARNING,
                workflow_id=msg.workflow_id,
                step=msg.step,
                error=str(exc),
            )
            return
        if isinstance(claim, ClaimRefused):
            self._ack(entry)
            if claim.verdict.value == "duplicate":
                self.stats.duplicates += 1
            telemetry.delivery_refused(claim.verdict.value, claim.state.value)
            log_event(
                "worker.claim_refused",
                workflow_id=msg.workflow_id,
                step=msg.step,
                verdict=claim.verdict.value,
                state=claim.state.value,
            )
            return
        self._started(claim, ready_at_ms=msg.at_ms)
        self._run(claim, entry)

    def _started(self, claim: Claim, *, ready_at_ms: int | None) -> None:
        self.stats.claimed += 1
        telemetry.step_started(
            workflow_name=claim.workflow_name,
            queue=claim.queue,
            attempt=claim.attempt,
            # The `now` the claim was made with.
            claimed_at=claim.lease_expires_at - timedelta(seconds=self.config.lease_seconds),
            available_at=claim.available_at,
            ready_at_ms=ready_at_ms,
        )

    def _ack(self, entry: Entry) -> None:
        """Acknowledge a handled ready entry, once, without waiting on Redis: the outbox
        sends it. Never retried: the claim (or its refusal) is already in the ledger, so
        an entry left pending is harmless — whoever takes it over later finds the step
        claimed and records a duplicate."""
        self.outbox.put(Ack(entry.stream, self.keys.workers_group, entry.id))

    def _run(self, claim: Claim, entry: Entry) -> None:
        """Run a claimed step, then each child whose outcome handed it straight to this
        thread (see `_record`), until one hands nothing on."""
        next_claim: Claim | None = self._run_claimed(claim, entry)
        while next_claim is not None:
            self.stats.handed_off += 1
            next_claim = self._run_claimed(next_claim, None)

    def _run_claimed(self, claim: Claim, entry: Entry | None) -> Claim | None:
        ctx = StepContext(
            workflow_id=claim.workflow_id,
            workflow_name=claim.workflow_name,
            step=claim.step,
            attempt=claim.attempt,
            max_attempts=claim.max_attempts,
            workflow_context=claim.workflow_context,
            results=claim.dependency_results,
            signal=claim.signal,
            workflow_outcome=claim.workflow_outcome,
            counters=claim.counters,
        )
        running = _Running(claim, ctx)
        key = (claim.workflow_id, claim.step, claim.job)
        with self._lock:
            self._running[key] = running
        # Registered first, so the heartbeat renews the lease even if the ack is slow.
        if entry is not None:
            self._ack(entry)
        log_event(
            "worker.step_started",
            workflow_id=claim.workflow_id,
            step=claim.step,
            attempt=claim.attempt,
            worker=claim.worker,
            handed_off=entry is None,
        )
        try:
            if not self._wait_for_slot(ctx):
                # Released on a drain, or its lease was lost, while it waited: it is no
                # longer ours to run (whoever holds it now will).
                return None
            try:
                started = time.perf_counter()
                status, payload = self._perform(claim, ctx)
                running.perform_ms = (time.perf_counter() - started) * 1000
            finally:
                self._performing.release()
            return self._record(claim, status, payload, running)
        finally:
            with self._lock:
                self._running.pop(key, None)
            running.done.set()

    def _wait_for_slot(self, ctx: StepContext) -> bool:
        """Take a performing slot; False (and no slot) if the step is cancelled first."""
        while not self._performing.acquire(timeout=0.05):
            if ctx.cancel_requested():
                return False
        if ctx.cancel_requested():
            self._performing.release()
            return False
        return True

    def _perform(self, claim: Claim, ctx: StepContext) -> tuple[str, Any]:
        try:
            worker_cls = load_worker(claim.worker)
            perform = worker_cls().perform
            if inspect.iscoroutinefunction(perform):
                result = asyncio.run(perform(claim.args, ctx))
            else:
                result = perform(claim.args, ctx)
                if inspect.isawaitable(result):
                    result = asyncio.run(_await(result))
        except Cancel as exc:
            return "cancelled", {"reason": str(exc)}
        except WorkerNotFoundError as exc:
            return "retryable", {"error": str(exc), "type": "WorkerNotFoundError"}
        except Exception as exc:
            return "retryable", {
                "error": f"{type(exc).__name__}: {exc}"[:1000],
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "traceback": traceback.format_exc()[-_TRACEBACK_CHARS:],
            }
        return "completed", result

    def _record(self, claim: Claim, status: str, payload: Any, running: _Running) -> Claim | None:
        """Record the outcome; publish the released children and the completion event.

        Hand-off: when the outcome releases a step of a queue this worker serves, the same
        transaction claims it for this worker, and the caller runs it next on this thread
        — no ready message, no second commit, no Redis round trip between parent and
        child. The claim is an ordinary one (lease, attempt, heartbeat), so everything
        that rescues a claimed step rescues this one. Returns that claim, or None.
        """
        queues = self.config.queues if self._may_hand_off(claim) else ()

        def record(conn: Any, status: str, payload: Any) -> _Recorded:
            result = complete_job(
                conn,
                claim.job,
                claim.workflow_id,
                claim.step,
                status,
                payload,
                attempt=claim.attempt,
                source="worker",
                now=utcnow(),
                dispatch=True,
                hand_off_queues=queues,
                hand_off_owner=self.config.name,
                hand_off_lease_seconds=self.config.lease_seconds,
            )
            return result, result.hand_off_claim, list(result.ready)

        key = claim.workflow_id
        # The outcome's read goes out with the group's lock (a callback's differs).
        hint = outcome_read_ahead(key, claim.step) if claim.job == STEP_JOB else None
        try:
            result, child, ready = self.ledger.run(
                lambda conn: record(conn, status, payload), order_key=key, hint=hint
            )
        except InvalidCompletionError as exc:
            # The result cannot be stored (not plain JSON): a bug that retrying will not
            # fix, recorded as a failure the operator can read.
            problem = {"error": f"the step's result could not be stored: {exc}"}
            result, child, ready = self.ledger.run(
                lambda conn: record(conn, "failed", problem), order_key=key
            )
        # The outcome is in the ledger: the heartbeat must not mistake the lease it just
        # gave up for a lost one.
        running.done.set()
        self._count(result)
        telemetry.completion_recorded(
            self.engine,
            result,
            source="worker",
            facts=telemetry.StepFacts(claim.workflow_name, claim.queue),
            duration_ms=running.perform_ms,
        )
        log_event(
            "worker.step_finished",
            workflow_id=claim.workflow_id,
            step=claim.step,
            attempt=claim.attempt,
            status=result.status,
            classification=result.classification.value,
            released=len(result.released),
        )
        if not result.applied or claim.job != STEP_JOB:
            # A callback has no children and no completion event.
            return None
        if ready and not self.publisher.publish_ready(ready_messages(ready)):
            # Hand them back to the dispatcher rather than wait for the stale deadline.
            in_transaction(self.engine, lambda conn: unmark_dispatched(conn, ready))
        self.outbox.put(
            CompletionEvent(
                claim.workflow_id,
                claim.step,
                CompletionStatus(result.status),
                result.attempt,
                now_ms(),
            )
        )
        if child is not None:
            self._started(child, ready_at_ms=None)
        return child

    def _may_hand_off(self, claim: Claim) -> bool:
        # Not while stopping: a drain must not pick up new work.
        return self.config.hand_off and claim.job == STEP_JOB and not self._stopping.is_set()

    def _count(self, result: CompletionResult) -> None:
        if not result.applied:
            return
        if result.status == "completed":
            self.stats.completed += 1
        elif result.status == "retryable":
            self.stats.retried += 1
        elif result.status == "failed":
            self.stats.failed += 1
        else:
            self.stats.cancelled += 1

    # -- leases and draining ---------------------------------------------------------------

    def _heartbeat(self, stop: threading.Event) -> None:
        interval = max(0.2, self.config.lease_seconds / 3)
        while not stop.wait(interval):
            self._renew_all()
        # Keep renewing while draining: in-flight steps are still running.
        while self._in_flight() and not self._drained.wait(interval):
            self._renew_all()

    def _renew_all(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for r in running:
            c = r.claim
            try:
                held = self._renew(c)
            except Exception:
                log_event("worker.lease_renew_failed", logging.WARNING, exc_info=True)
                continue
            if not held and not r.done.is_set():
                r.context._cancel.set()
                log_event(
                    "worker.lease_lost",
                    logging.WARNING,
                    workflow_id=c.workflow_id,
                    step=c.step,
                    attempt=c.attempt,
                )

    def _renew(self, c: Claim) -> bool:
        def renew(conn: Connection) -> bool:
            return renew_job_lease(
                conn,
                c.job,
                c.workflow_id,
                c.step,
                owner=c.lease_owner,
                attempt=c.attempt,
                lease_seconds=self.config.lease_seconds,
                now=utcnow(),
            )

        return in_transaction(self.engine, renew)

    def _release(self, c: Claim) -> bool:
        def release(conn: Connection) -> bool:
            return release_job_claim(
                conn,
                c.job,
                c.workflow_id,
                c.step,
                owner=c.lease_owner,
                attempt=c.attempt,
                now=utcnow(),
            )

        return in_transaction(self.engine, release)

    def _in_flight(self) -> bool:
        with self._lock:
            return self._handlers > 0

    def _drain(self) -> None:
        cfg = self.config
        log_event("worker.draining", worker=cfg.name, in_flight=self._handlers)
        deadline = utcnow().timestamp() + cfg.drain_seconds
        with self._lock:
            while self._handlers > 0:
                left = deadline - utcnow().timestamp()
                if left <= 0:
                    break
                self._idle.wait(left)
            leftovers = list(self._running.values())
        # Every step is told first, before any claim's release (a ledger write) is
        # waited on: a performing step that stops frees its slot, and a step still
        # waiting for that slot must find itself cancelled when it gets it, not run.
        for r in leftovers:
            r.context._cancel.set()
        for r in leftovers:
            c = r.claim
            released = self._release(c)
            if released:
                self.stats.released_on_drain += 1
            log_event(
                "worker.released_on_drain",
                workflow_id=c.workflow_id,
                step=c.step,
                attempt=c.attempt,
                released=released,
            )
        self._drained.set()


async def _await(awaitable: Any) -> Any:
    return await awaitable
