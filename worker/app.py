"""``make_celery(settings)``: the worker's Celery app, built from settings alone.

The delivery settings (see ``docs/delivery.md``): late acknowledgement, a lost pool child's
message requeued at once, queued messages handed to the pool in batches of at most
``POSTROOM_WORKER_BATCH`` (:mod:`postroom.worker.batching`), and a broker redelivery window longer
than the longest send (checked here, at start-up).
"""

from __future__ import annotations

import gc
from typing import Any

import redis
from celery import Celery, bootsteps
from celery.signals import worker_process_shutdown, worker_shutting_down

from postroom.shared.celery_wire import redis_transport
from postroom.shared.connections import redis_clients, same_redis
from postroom.shared.queue import Enqueuer, accepted_jobs, celery_config
from postroom.shared.settings import Settings
from postroom.worker import batching, budgets, instances, metrics, probes, tasks
from postroom.worker.lease import check_timeouts
from postroom.worker.resources import WorkerContext
from postroom.worker.schedule import Mover, Watcher
from postroom.worker.webhooks import Deliverer


class _Contexts:
    """One WorkerContext per process: a pool child builds its own after the fork."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pid: int | None = None
        self._ctx: WorkerContext | None = None

    def __call__(self) -> WorkerContext:
        import os

        if self._ctx is None or self._pid != os.getpid():
            self._ctx = WorkerContext.build(self._settings)
            self._pid = os.getpid()
        return self._ctx

    def close(self, **_: Any) -> None:
        """Say QUIT to this process's kept SMTP connections (the process is ending)."""
        import os

        if self._ctx is not None and self._pid == os.getpid() and "pool" in vars(self._ctx):
            self._ctx.pool.close_all()


def make_celery(settings: Settings) -> Celery:
    """The worker's app; raises ConfigError when the timeouts cannot keep a send single."""
    check_timeouts(settings)
    app = Celery("postroom-worker", set_as_current=False)
    app.conf.update(celery_config(settings))
    transport = redis_transport.transport_for(settings.broker_url)
    if transport is not None:  # postroom's Redis transport (celery_wire.redis_transport)
        app.conf.broker_transport = transport
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # each pool process may have a whole batch reserved (postroom.worker.batching)
        worker_prefetch_multiplier=settings.worker_batch,
        postroom_worker_batch=settings.worker_batch,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_track_started=False,
        result_extended=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # messages it cannot read are set aside in Redis, not dropped
        # (postroom.shared.celery_wire.dead_letters)
        worker_consumer="postroom.shared.celery_wire.dead_letters:Consumer",
    )
    contexts = _Contexts(settings)
    tasks.register(app, contexts, settings)
    worker_process_shutdown.connect(contexts.close, weak=False)
    worker_shutting_down.connect(batching.stop_soon, weak=False)
    app.conf.postroom_contexts = contexts
    app.conf.postroom_settings = settings
    app.conf.postroom_dead_letter_counted = metrics.dead_letter

    class SchedulerStep(bootsteps.StartStopStep):
        """Moves due retries and deferred sends back onto the queue, and publishes again
        accepted jobs the broker lost (main process)."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.mover: Mover | None = None

        def start(self, parent: Any) -> None:
            ctx = WorkerContext.build(settings)
            accepted = accepted_jobs(ctx.state, settings)
            enqueuer = Enqueuer(app, settings.queue, accepted)
            watcher = Watcher(accepted, ctx.schedule, ctx.documents, ctx.leases,
                              enqueuer.enqueue, settings.result_ttl)
            self.mover = Mover(ctx.schedule, enqueuer.enqueue, watcher=watcher)
            self.mover.start()

        def stop(self, parent: Any) -> None:
            if self.mover is not None:
                self.mover.stop()

    class BudgetStep(bootsteps.Step):
        """Splits the instance's send budgets over its pool processes (main process, before
        the pool forks: each process inherits its share, :mod:`postroom.worker.budgets`), and sizes
        the batches (and the prefetch) by it. A process keeps at most its share, and at
        most the batch it was handed, in flight."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            processes = int(getattr(parent, "max_concurrency", None) or parent.concurrency)
            share = budgets.split(settings, processes)
            budgets.configure(share)
            batch = budgets.batch_size(settings, share)
            app.conf.postroom_worker_batch = batch
            parent.prefetch_multiplier = batch

    class InstanceStep(bootsteps.StartStopStep):
        """Names this worker instance (before the pool forks: its processes name it in
        their leases), beats for it, and takes back the messages of instances that
        stopped beating (:mod:`postroom.worker.instances`)."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            instances.configure(instances.new_id())
            self.heartbeat: instances.Heartbeat | None = None
            self.connection: Any = None

        def start(self, parent: Any) -> None:
            state = WorkerContext.build(settings).state
            clients = [state]
            restore = None
            if transport is not None:  # postroom's Redis transport notes what each holds
                broker = redis.Redis.from_url(settings.broker_url, socket_timeout=10.0)
                clients = [broker] if same_redis(settings.broker_url, settings.redis_url) else [
                    broker, state]
                self.connection = app.connection_for_write()
                channel = self.connection.default_channel

                def restore(tags: list[str]) -> None:
                    redis_transport.restore(channel, tags)

            self.heartbeat = instances.Heartbeat(
                instances.current() or instances.new_id(), clients, restore,
                settings.instance_heartbeat_s, settings.instance_dead_after_s,
            ).start()

        def stop(self, parent: Any) -> None:
            if self.heartbeat is not None:
                self.heartbeat.stop()
            if self.connection is not None:
                self.connection.release()

    app.steps["worker"].add(SchedulerStep)
    app.steps["worker"].add(BudgetStep)
    app.steps["worker"].add(InstanceStep)
    app.steps["worker"].add(WebhookStep)
    app.steps["worker"].add(HeapStep)
    metrics.install(app, settings)  # before the pool forks: its processes count in files
    probes.install(app, settings)
    return app


class WebhookStep(bootsteps.StartStopStep):
    """Delivers the solutions' events to their webhook endpoints (main process, threads:
    :mod:`postroom.worker.webhooks`)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.deliverer: Deliverer | None = None

    def start(self, parent: Any) -> None:
        settings: Settings = parent.app.conf.postroom_settings
        state, _ = redis_clients(settings, socket_timeout=10.0)
        self.deliverer = Deliverer(settings, state)
        self.deliverer.start()

    def stop(self, parent: Any) -> None:
        if self.deliverer is not None:
            self.deliverer.stop()


class HeapStep(bootsteps.Step):
    """Freezes the main process's objects before the pool forks (``gc.freeze``): the pool
    processes share the pages of every module the worker imported, and their garbage
    collector, which would otherwise write into each of those objects' headers while it
    looks for cycles, leaves them alone, so the pages stay shared instead of being copied
    into each process (the figure: ``docs/throughput.md``). The frozen objects are the
    modules and the app, which live as long as the process anyway."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        gc.freeze()
