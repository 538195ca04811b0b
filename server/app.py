"""The FastAPI application: routes, error handlers and guards around one AsyncLLMEngine.

    app = build_app(state)          # state: ServerState (engine, tokenizer, names, settings)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes are module-level functions that read `app.state.ldmole`, so the same app runs under uvicorn,
in-process test clients and schema fuzzers alike.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

import ldmole_runtime
from ldmole_server import admin, chat, completions, scoring, ui_page
from ldmole_server.errors import install_error_handlers
from ldmole_server.middleware import GuardMiddleware
from ldmole_server.state import ServerState


def build_app(state: ServerState, on_ready=None) -> FastAPI:
    """on_ready(): called once the app has started (e.g. to print how to reach it)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield
        # uvicorn has stopped accepting connections and waited for open ones (up to its graceful
        # timeout); whatever still runs is aborted so its KV blocks are freed.
        await state.engine.drain(0.0)
        await state.engine.shutdown()

    app = FastAPI(title="ldmole", version=ldmole_runtime.__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for LD-MoLE adapter sets on one base model.")
    app.state.ldmole = state
    for module in (completions, chat, scoring, admin, ui_page):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, settings=state.settings)
    return app
