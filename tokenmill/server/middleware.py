"""Pure-ASGI middleware: request ids, access logs, body size limit, API keys.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched, token by token.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.errors import RequestTooLarge, TokenmillError, Unauthorized
from tokenmill.protocol import lenient_fields
from tokenmill.server.errors import error_body_for, error_headers, speaks_anthropic, status_for
from tokenmill.tenants import ANONYMOUS_TENANT, Tenant

access_log = logging.getLogger("tokenmill.access")


async def _send_error(send: Send, error: TokenmillError, request_id: str, path: str) -> int:
    body = json.dumps(error_body_for(path, error)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(error).items()]
    status = status_for(error)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


class RequestContext:
    """Request id in and out, an access log line per request, auth (and the key's tenant, in
    `scope["state"]["tenant"]`), the body size limit, and whether unknown body fields are dropped
    (`--lenient-fields`) rather than refused."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tenants: dict[str, Tenant],
        protect_metrics: bool,
        max_body_bytes: int,
        json_logs: bool,
        on_response: Callable[[Scope, int], None],
        open_paths: frozenset[str],
        metrics_path: str,
        lenient: bool = False,
    ):
        self.app = app
        self._api_keys = [(key.encode(), tenant) for key, tenant in tenants.items()]
        self._protect_metrics = protect_metrics
        self._max_body = max_body_bytes
        self._json_logs = json_logs
        self._on_response = on_response
        self._open_paths = open_paths
        self._metrics_path = metrics_path
        self._lenient = lenient

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = _clean_request_id(headers.get(b"x-request-id")) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            tenant = self._tenant(scope["path"], headers)
            if tenant is None:
                status_holder["status"] = await _send_error(send, _no_key(scope["path"]), request_id, scope["path"])
                return
            scope["state"]["tenant"] = tenant
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self._max_body:
                error = RequestTooLarge(f"The request body exceeds {self._max_body} bytes.")
                status_holder["status"] = await _send_error(send, error, request_id, scope["path"])
                return
            with lenient_fields(self._lenient):
                await self.app(scope, self._limited(receive), send_with_id)
        finally:
            self._log(scope, status_holder["status"], time.perf_counter() - started, request_id)
            self._on_response(scope, status_holder["status"])

    def _tenant(self, path: str, headers: dict[bytes, bytes]) -> Tenant | None:
        """The caller's tenant; None when a key is needed and not given right."""
        if not self._api_keys or path in self._open_paths or (path == self._metrics_path and not self._protect_metrics):
            return ANONYMOUS_TENANT
        given = headers.get(b"authorization", b"")
        # a bearer token, or Anthropic's x-api-key header (its SDK sends only that)
        token = given[7:] if given[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        # compare against every key, always, in constant time per key (no early exit)
        matches = [tenant for key, tenant in self._api_keys if hmac.compare_digest(token, key)]
        return matches[0] if matches and token else None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self._max_body:
                    raise RequestTooLarge(f"The request body exceeds {self._max_body} bytes.")
            return message

        return wrapped

    def _log(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        client = scope.get("client") or ("-", 0)
        fields = {
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "client": f"{client[0]}:{client[1]}",
        }
        if self._json_logs:
            access_log.info(json.dumps(fields))
        else:
            access_log.info(
                "%s %s %s %d %.1fms %s",
                fields["client"],
                fields["method"],
                fields["path"],
                status,
                fields["duration_ms"],
                request_id,
            )


def _no_key(path: str) -> Unauthorized:
    how = (
        "'x-api-key: <key>' or 'Authorization: Bearer <key>'"
        if speaks_anthropic(path)
        else "'Authorization: Bearer <key>'"
    )
    return Unauthorized(f"Missing or invalid API key: send {how}.")


def _clean_request_id(raw: bytes | None) -> str | None:
    """Accept a caller's id only if it is short and printable (it goes into logs and headers)."""
    if not raw or len(raw) > 128:
        return None
    text = raw.decode("ascii", "ignore")
    return text if text.isprintable() and text.strip() == text and text else None
