"""What both Serve apps do at the HTTP edge, before a request may touch a model: bearer auth, a body
read under a size limit and a deadline, JSON parsing that turns every malformed body into a 400, a
bound on requests waiting per replica, and errors in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with no internal exception text.

Why here and not in Serve's options: Serve hands the body to the replica as it arrives, so a client
that sends headers and then stalls holds one of the replica's ``max_ongoing_requests`` slots until
something gives up on it; the deadline below is that something, and the apps set
``max_ongoing_requests`` well above the model's batch so that a few stalled clients cannot fill it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse

logger = logging.getLogger("ray.serve")

MAX_JSON_DIGITS = 100  # no field needs a longer number; int("9" * 4301) raises inside json.loads


class APIError(Exception):
    """A request error with its HTTP status, rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = dict(headers or {})
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type, self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def internal_error(what: str, exc: BaseException) -> APIError:
    """A 500 that names an id the server log has, never the exception's text."""
    ref = uuid.uuid4().hex[:12]
    logger.error("%s failed (ref %s)", what, ref, exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"{what} failed on the server (ref {ref})", type="server_error")


def unicode_error(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (a lone surrogate such as "\\ud800" parses as JSON but cannot be
    encoded, and tokenizers fail on it), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"character {e.start} is a lone surrogate"
    return None


def check_auth(request: Request, api_key: str | None) -> None:
    """401 unless ``api_key`` is None or the request carries ``Authorization: Bearer <api_key>``."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: no timing side channel on the key
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or 413 past ``max_bytes`` / 408 when it has not arrived within ``timeout_s``."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body is {int(length)} bytes; the limit is {max_bytes}")
    body = bytearray()

    async def read():
        async for chunk in request.stream():  # chunked uploads carry no content-length
            body.extend(chunk)
            if len(body) > max_bytes:
                raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s (got {len(body)} bytes)",
                       code="body_timeout") from None
    return bytes(body)


def parse_json(body: bytes):
    """A request body -> its JSON value; 400 for anything that is not small, plain JSON."""
    try:
        text = (body or b"{}").decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not UTF-8 (byte {e.start})") from None

    def number(s: str):
        if len(s.lstrip("-")) > MAX_JSON_DIGITS:
            raise APIError(400, f"request body holds a number of {len(s)} characters; the limit is {MAX_JSON_DIGITS}")
        return int(s)

    try:
        return json.loads(text, parse_int=number, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    except RecursionError:  # C parser's guard: thousands of nested brackets
        raise APIError(400, "request body nests too deeply") from None
    except ValueError:
        raise APIError(400, "request body is not valid JSON") from None


def _no_constant(name: str):
    raise APIError(400, f"request body is not valid JSON: {name} is not a JSON number")


class Admission:
    """At most ``limit`` requests of a replica past the edge and not yet answered; beyond, 503 with
    Retry-After in OpenAI's shape (Serve's own queue limit answers in plain text, so this one fires first)."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def __enter__(self):
        if self.active >= self.limit:
            raise APIError(503, f"the server is busy ({self.active} requests in progress); retry shortly",
                           type="server_error", code="overloaded", headers={"Retry-After": "1"})
        self.active += 1
        return self

    def __exit__(self, *exc):
        self.active -= 1
        return False
