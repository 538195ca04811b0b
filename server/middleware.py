"""ASGI guards in front of every route: the API key and the request-body size limit."""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException

from ldmole_server.errors import error_body

# Reachable without the key, as in vLLM: liveness probes and the Prometheus scraper.
OPEN_PATHS = ("/health", "/version", "/metrics", "/docs", "/openapi.json", "/redoc")


async def _send_error(send, status: int, message: str, type_: str, extra_headers=()) -> None:
    body = json.dumps(error_body(status, message, type_)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised while FastAPI reads a chunked body that outgrows the limit; FastAPI passes an
    HTTPException through untouched, so the client gets a 413 in the OpenAI shape."""

    def __init__(self, message: str):
        super().__init__(413, message)


class GuardMiddleware:
    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and not scope["path"].startswith(OPEN_PATHS):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await _send_error(send, 401, "a valid API key is required: Authorization: Bearer <key>",
                                         "AuthenticationError", [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        limit = self.max_body_bytes
        too_large = f"the request body is over the limit of {limit} bytes"
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(send, 413, too_large, "BadRequestError")
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(too_large)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # read outside FastAPI's handlers
            if not started:
                await _send_error(send, 413, exc.detail, "BadRequestError")
