"""ASGI guards in front of every route: the API key, the admin surface and the request-body size limit."""

from __future__ import annotations

import json
import uuid

from starlette.exceptions import HTTPException

from ldmole_server.errors import REQUEST_ID, error_body


async def _send_error(send, status: int, message: str, type_: str | None, extra_headers=()) -> None:
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
    def __init__(self, app, settings):
        self.app, self.settings = app, settings  # a ServerSettings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = f"req-{uuid.uuid4().hex[:16]}"
        given = headers.get(b"authorization", b"")
        settings = self.settings
        refused = settings.refusal(scope["path"], given)
        if refused is not None:
            status, message = refused
            auth = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            return await _send_error(send, status, message, None, auth)
        length = headers.get(b"content-length")
        limit = settings.max_body_bytes
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
                message = message | {"headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        REQUEST_ID.set(rid)
        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # read outside FastAPI's handlers
            if not started:
                await _send_error(send, 413, exc.detail, "BadRequestError")
