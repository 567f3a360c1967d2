"""The application factory: `create_app(settings)` wires a runner into the HTTP layer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import tokenmill
from tokenmill.config import Settings
from tokenmill.protocol import now
from tokenmill.runners import Runner, build_runner
from tokenmill.server.errors import install_error_handlers
from tokenmill.server.routes import router


def create_app(settings: Settings | None = None, runner: Runner | None = None) -> FastAPI:
    """Build the app; the runner (built from settings unless given) starts and stops with it."""
    settings = settings or Settings()
    runner = runner or build_runner(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()

    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.runner = runner
    app.state.started_at = now()
    install_error_handlers(app)
    app.include_router(router)
    return app
