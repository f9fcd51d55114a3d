"""The ASGI application: ``app.main:app``, built by ``create_app(settings)``.

    uvicorn app.main:app          # settings from CHARNN_* environment variables

The factory does no I/O; the lifespan opens the store, starts the job runner
(which resumes jobs interrupted by a crash) and stops both on shutdown. With
``CHARNN_DATABASE_URL`` and ``CHARNN_BROKER_URL`` set, the store is PostgreSQL
and jobs run on Celery workers (app/distributed.py); otherwise SQLite and
processes of this server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from threadpoolctl import threadpool_limits

from .deps import AppState
from .errors import install_error_handlers
from .events import EventHub
from .limits import BodyLimitMiddleware
from .model_cache import ModelCache
from .model_schemas import GenerateIn, PredictIn, ScoreIn
from .openapi import install_openapi
from .routes import demo, health, jobs, models
from .runner import ProcessRunner, Runner
from .schemas import JobCreate
from .security import JsonCORSMiddleware, SecurityHeadersMiddleware
from .settings import Settings, get_settings
from .shutdown import ShutdownWatch
from .store import SqliteStore, Store


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # numpy in the API process: one BLAS thread, the cores are for training jobs.
        blas = threadpool_limits(settings.api_blas_threads)
        events = EventHub(asyncio.get_running_loop())
        store: Store
        runner: Runner
        if settings.distributed:
            # Scale-out: shared PostgreSQL store, jobs on Celery workers, events over Redis.
            from .distributed import CeleryRunner
            from .store_pg import PostgresStore

            assert settings.database_url is not None
            shared = await asyncio.to_thread(PostgresStore, settings.database_url)
            store = shared
            runner = CeleryRunner(shared, settings, on_event=events.publish)
            await asyncio.to_thread(runner.start)
        else:
            store = SqliteStore(settings.data_dir)  # StoreError: in use, damaged -> no start
            runner = ProcessRunner(
                store,
                max_concurrent_jobs=settings.max_concurrent_jobs,
                job_threads=settings.job_threads,
                job_nice=settings.job_nice,
                checkpoint_every_s=settings.checkpoint_every_s,
                limits=settings.model_limits,
                job_files_retention_s=settings.job_files_retention_s,
                on_event=events.publish,
            )
            runner.start()

        def shutting_down() -> None:
            events.close()  # every event stream ends now: nothing holds the shutdown up
            runner.begin_stop()  # jobs checkpoint while the server drains its connections

        watch = ShutdownWatch(asyncio.get_running_loop(), shutting_down)
        watch.install()
        cache = ModelCache(store, settings.model_cache_size)
        app.state.charnn = AppState(settings, store, runner, events, cache)
        try:
            yield
        finally:
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
    app.add_middleware(SecurityHeadersMiddleware)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    demo.mount(app)
    install_openapi(app, [JobCreate, PredictIn, GenerateIn, ScoreIn])
    return app


app = create_app()
