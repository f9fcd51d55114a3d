"""The ASGI application: ``app.main:app``, built by ``create_app(settings)``. Wiring only.

    uvicorn app.main:app          # settings from CHARNN_* environment variables

The factory does no I/O; the lifespan builds one of two pairs and the services
on top of them, and stops them on shutdown:

- embedded (the default): ``SqliteStore`` in the data directory and
  ``LocalRunner``, processes of this server (which resumes jobs a crash
  interrupted); under ``charnn serve --workers N`` each worker's ``LocalRunner``
  is wrapped in a ``RunnerRole`` (``app/jobs/role.py``), and one worker runs jobs;
- scale-out (``CHARNN_DATABASE_URL`` and ``CHARNN_BROKER_URL`` set):
  ``PostgresStore`` and ``CeleryRunner``, jobs on ``charnn worker`` processes,
  events over Redis.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from threadpoolctl import threadpool_limits

from .api import demo, docs, health, hyperparameters, jobs, metrics, models, sessions
from .api.deps import AppState
from .api.limits import BodyLimitMiddleware
from .api.observe import ObserveMiddleware
from .api.openapi import install_openapi
from .api.security import JsonCORSMiddleware, security_headers
from .api.shutdown import ShutdownWatch
from .errors import install_error_handlers
from .jobs.events import EventHub
from .jobs.runner import Runner
from .jobs.schemas import JobCreate
from .jobs.service import JobService
from .metrics import JOBS, job_gauges
from .serving.cache import BatchLimits, ModelCache
from .serving.schemas import GenerateIn, PredictIn, ScoreIn
from .serving.service import ModelService
from .settings import Settings, get_settings
from .store.base import Store, StoreError

log = logging.getLogger("charnn.main")


async def _store_and_runner(settings: Settings, events: EventHub) -> tuple[Store, Runner]:
    if settings.distributed:
        from .jobs.celery_runner import CeleryRunner
        from .store.postgres import PostgresStore

        assert settings.database_url is not None
        shared = await asyncio.to_thread(PostgresStore, settings.database_url)
        runner = CeleryRunner(shared, settings, on_event=events.publish)
        await asyncio.to_thread(runner.start)
        return shared, runner
    from .jobs.local import LocalRunner
    from .store.sqlite import OWNER_ENV, SqliteStore

    # A worker of `charnn serve --workers N`: its parent holds the data directory.
    owner = os.environ.get(OWNER_ENV)
    owner_pid = int(owner) if owner is not None and owner.isdigit() else None
    # StoreError (in use, damaged, a parent that does not hold it): no start
    local = SqliteStore(settings.data_dir, owner=owner_pid)
    embedded = LocalRunner(
        local,
        max_concurrent_jobs=settings.max_concurrent_jobs,
        job_threads=settings.job_threads,
        job_nice=settings.job_nice,
        checkpoint_every_s=settings.checkpoint_every_s,
        limits=settings.model_limits,
        job_files_retention_s=settings.job_files_retention_s,
        on_event=events.publish,
    )
    if owner_pid is not None:
        from .jobs.role import RunnerRole

        try:
            role = RunnerRole(local, embedded, events, owner_pid)
            role.start()  # this worker runs the jobs if no other one does
        except BaseException:
            local.close()
            raise
        return local, role
    embedded.start()
    return local, embedded


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # numpy in the API process: one BLAS thread, the cores are for training jobs.
        blas = threadpool_limits(settings.api_blas_threads)
        events = EventHub(asyncio.get_running_loop())
        try:
            store, runner = await _store_and_runner(settings, events)
        except StoreError as e:  # in use by another server, damaged: one line, no traceback
            log.error("charnn cannot start: %s", e)
            raise SystemExit(3) from None

        typing = sessions.SessionRegistry(settings.max_sessions, settings.session_idle_s)

        def shutting_down() -> None:
            events.close()  # every event stream ends now: nothing holds the shutdown up
            typing.close_all()  # and every typing session
            runner.begin_stop()  # jobs checkpoint while the server drains its connections

        watch = ShutdownWatch(asyncio.get_running_loop(), shutting_down)
        watch.install()
        batching = BatchLimits(settings.max_batch, settings.max_batch_delay_ms / 1000)
        cache = ModelCache(store, settings.model_cache_size, batch_limits=batching)
        JOBS.read = lambda: job_gauges(store)  # /metrics reads the job gauges from the store
        app.state.charnn = AppState(
            settings,
            store,
            runner,
            JobService(store, runner, events, settings),
            ModelService(store, cache, settings.model_limits, settings.max_body_bytes),
            typing,
        )
        # What start-up built lives as long as the server: out of the collector's sight,
        # a full collection scans little. Measured: gen-2 pauses of 58-71 ms about once a
        # second under load (every client stalled at once) fell to 2-4 ms, and the typed
        # /predict p99 at 32 clients from 92-158 ms to 30-31 ms.
        # No gc.collect() first: it cost ~60 ms a start (tests start hundreds of apps), and
        # what start-up leaves as garbage is small and freed with the process.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # an app made and stopped many times (tests) leaks no cycles
            JOBS.read = None
            watch.uninstall()
            watch.fire()
            await asyncio.to_thread(runner.stop)
            store.close()
            blas.restore_original_limits()

    app = FastAPI(
        title="charnn",
        summary="Train character-level RNNs in numpy and serve their predictions.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # app/api/docs.py serves both from installed assets, not a CDN
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            JsonCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    # outermost: every answer has its id, its metrics and the security headers (one pass)
    app.add_middleware(ObserveMiddleware, headers=security_headers)
    app.include_router(models.router)  # first: /predict is matched before the others
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(hyperparameters.router)
    app.include_router(sessions.router)
    demo.mount(app)
    docs.mount(app)
    install_openapi(app, [JobCreate, PredictIn, GenerateIn, ScoreIn])
    return app


app = create_app()
