"""Every error leaves the server in the OpenAI shape, {"error": {"message", "type", "param", "code"}},
with its status decided here, in one place: a client mistake is a 4xx, never a 500."""

from __future__ import annotations

import contextvars
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ldmole_runtime.errors import (
    EngineOverloadedError,
    LDMoleError,
    PromptTooLongError,
    StepFailedError,
    UnknownAdapterError,
)

logger = logging.getLogger("ldmole.server")
# the id of the HTTP request being served (set by server/middleware.py; also its x-request-id header)
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Most specific first: (exception class, HTTP status, OpenAI error type).
STATUS = (
    (UnknownAdapterError, 404, "NotFoundError"),
    (PromptTooLongError, 413, "BadRequestError"),
    (EngineOverloadedError, 503, "ServiceUnavailableError"),
    (LDMoleError, 400, "BadRequestError"),
    (StepFailedError, 500, "InternalServerError"),
)
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowed", 413: "BadRequestError", 422: "BadRequestError", 429: "RateLimitError",
          503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error raised by a route with its status chosen there (e.g. max_tokens beyond the context)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "InternalServerError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param), status_code=status)


def classify_exception(exc: BaseException) -> tuple[int, str, str]:
    """(status, type, message) of any exception a route may raise."""
    if isinstance(exc, APIError):
        return exc.status, _TYPES.get(exc.status, "BadRequestError"), exc.message
    for cls, status, type_ in STATUS:
        if isinstance(exc, cls) and status != 500:
            return status, type_, " ".join(str(exc).split())
    # a server fault: its text (exception messages, paths, tracebacks) goes to the log, not to the client
    rid = REQUEST_ID.get()
    logger.error("request %s failed", rid, exc_info=exc)
    return 500, "InternalServerError", f"internal error; the server log has the details under request id {rid}"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = ".".join(loc)
    return (f"{where}: {first.get('msg')}" if where else str(first.get("msg"))), (where or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, "BadRequestError", param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    async def _known(request: Request, exc: Exception):
        status, type_, message = classify_exception(exc)
        param = exc.param if isinstance(exc, APIError) else None
        return error_response(status, message, type_, param)

    # Known kinds are answered by the exception middleware; anything else reaches Starlette's
    # server-error middleware, which answers with the same shape and logs the traceback.
    for cls in (APIError, LDMoleError, StepFailedError):
        app.add_exception_handler(cls, _known)
    app.add_exception_handler(Exception, _known)
