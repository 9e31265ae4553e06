"""Building engine processes from options: what `streamflow worker|consume|run` start."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine

from streamflow.engine.common import consumer_name
from streamflow.engine.consumer import CompletionConsumer, ConsumerConfig
from streamflow.engine.loader import import_apps
from streamflow.engine.maintenance import Maintenance, MaintenanceConfig
from streamflow.engine.runner import Runner
from streamflow.engine.worker_runtime import WorkerConfig, WorkerRuntime
from streamflow.reconciler import Reconciler, ReconcilerConfig
from streamflow.streams.keys import StreamKeys
from streamflow.streams.transport import StreamTransport


@dataclass(frozen=True, slots=True)
class EngineOptions:
    #: Run a worker for these queues (empty: no worker in this process).
    queues: tuple[str, ...] = ()
    concurrency: int = 8
    #: Steps a worker holds at once (None: 4 x concurrency); see `WorkerConfig.in_flight`.
    in_flight: int | None = None
    #: Modules with the user's Worker classes, imported at start.
    apps: tuple[str, ...] = ()
    consumer: bool = False
    maintenance: bool = False
    #: Run the reconciler loop every this many seconds (None: not in this process).
    reconcile_every: float | None = None
    lease_seconds: float = 30.0
    drain_seconds: float = 30.0
    redispatch_after_seconds: float = 30.0
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    batch: int = 200
    #: Workers run a child their step released next, claimed in the same commit.
    hand_off: bool = True


def build_runner(
    engine: Engine, transport: StreamTransport, keys: StreamKeys, options: EngineOptions
) -> tuple[Runner, list[object]]:
    """A Runner with the components the options ask for, and those components (whose
    `.stats` say what each handled)."""
    import_apps(list(options.apps))
    runner = Runner()
    components: list[object] = []
    if options.queues:
        worker = WorkerRuntime(
            engine,
            transport,
            keys,
            WorkerConfig(
                queues=options.queues,
                name=consumer_name("worker"),
                concurrency=options.concurrency,
                in_flight=options.in_flight,
                lease_seconds=options.lease_seconds,
                drain_seconds=options.drain_seconds,
                claim_idle_ms=options.claim_idle_ms,
                max_deliveries=options.max_deliveries,
                hand_off=options.hand_off,
            ),
        )
        runner.add("worker", worker.run)
        components.append(worker)
    if options.consumer:
        consumer = CompletionConsumer(
            engine,
            transport,
            keys,
            ConsumerConfig(
                name=consumer_name("consumer"),
                batch=options.batch,
                claim_idle_ms=options.claim_idle_ms,
                max_deliveries=options.max_deliveries,
            ),
        )
        runner.add("consumer", consumer.run)
        components.append(consumer)
    if options.maintenance:
        maintenance = Maintenance(engine, transport, keys, MaintenanceConfig())
        maintenance.queues.update(options.queues)
        runner.add("maintenance", maintenance.run)
        components.append(maintenance)
    if options.reconcile_every is not None:
        every = options.reconcile_every
        reconciler = Reconciler(
            engine,
            transport,
            keys,
            ReconcilerConfig(
                redispatch_after=timedelta(seconds=options.redispatch_after_seconds),
                pending_idle_ms=max(options.claim_idle_ms * 2, 1000),
                max_deliveries=options.max_deliveries,
            ),
        )
        runner.add("reconciler", lambda stop: reconciler.run(stop, every))
        components.append(reconciler)
    return runner, components
