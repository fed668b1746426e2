"""The pure-ASGI layer around the app: request ids, the body cap, client-disconnect watching,
the generation metrics and the access log.

For every HTTP request :class:`RequestMiddleware`

* takes the client's ``X-Request-ID`` when it is sane (1-128 of ``A-Z a-z 0-9 . _ : / + = @ -``),
  else makes one, and sends it back in the ``X-Request-ID`` header of every answer; error
  bodies carry it as ``request_id`` and log lines as ``request_id``;
* answers 400 to a Host outside ``allowed_hosts`` (when set: DNS rebinding reaches a loopback
  server under a foreign name);
* caps the body at ``max_body_bytes`` (413, before the app parses anything; the connection's
  read deadline, connections.py, bounds how long the rest may trickle in);
* watches a generation request's connection after its body: the moment the client goes away,
  :attr:`RequestContext.disconnected` is set, so the handler drops its job if it has not run;
* records status and duration of generation requests (``irt_requests_total``,
  ``irt_request_duration_seconds{mode, database}``);
* writes one access-log line (method, path, status, duration, request id, mode, database, n).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from imageragturbo.service.logs import request_id_var
from imageragturbo.service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/generate", "/v1/images/generations"})
OPENAI_PREFIX = "/v1/"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request whose client went away before its answer (logged, never sent)."""
CLIENT_GONE = object()
"""What _read_body returns when the connection closed before the body's end."""

OPENAI_ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


@dataclass
class RequestContext:
    """What the handlers tell the middleware about a request (``request.state.irt``)."""

    request_id: str
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    mode: str | None = None
    database: str | None = None
    n: int | None = None
    prompt: str | None = None
    user: str | None = None
    outcome: str | None = None
    """``cancelled`` when the request's job was dropped before it ran."""
    warnings: int = 0
    answered: bool = False
    """The answer has started (a disconnect after that is the normal end of the exchange)."""


def request_id_from(headers) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            try:
                given = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if SANE_REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def error_body(path: str, status: int, detail: str, request_id: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The JSON error body: ``{"detail", "request_id"}``, or OpenAI's ``{"error": {...}}`` under /v1/."""
    if path.startswith(OPENAI_PREFIX):
        kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": detail, "type": kind, "param": param, "code": code}, "request_id": request_id}
    return {"detail": detail, "request_id": request_id}


def internal_error(request_id: str) -> str:
    """What a 500 says: never the exception, which the log has (with this request id)."""
    return f"internal error, request id {request_id}"


def host_of(headers) -> str | None:
    """The Host header's name, lower case, without the port (an IPv6 literal keeps its brackets)."""
    for name, value in headers:
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):
                return host[: host.find("]") + 1] if "]" in host else host
            return host.rsplit(":", 1)[0] if ":" in host else host
    return None


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    if not host:
        return False
    return any(
        pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
        for pattern in allowed
    )


def user_hash(user: str | None) -> str | None:
    """What the log keeps of an end-user id: a short hash, never the id."""
    return hashlib.sha256(user.encode()).hexdigest()[:16] if user else None


class RequestMiddleware:
    def __init__(
        self,
        app,
        *,
        max_body_bytes: int,
        metrics: ServiceMetrics,
        access_log: bool,
        log_prompts: bool,
        allowed_hosts: tuple[str, ...] = (),
    ):
        from imageragturbo.service.logs import configure_service_logging

        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = allowed_hosts
        self.metrics = metrics
        self.access_log = access_log
        self.log_prompts = log_prompts
        self.access_logger = configure_service_logging()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        context = RequestContext(request_id=request_id_from(scope.get("headers", ())))
        scope.setdefault("state", {})["irt"] = context
        token = request_id_var.set(context.request_id)
        generation = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        status = 500
        started = False
        header = (b"x-request-id", context.request_id.encode("ascii"))

        async def send_tracking(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                context.answered = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        watcher = None
        try:
            host = host_of(scope.get("headers", ()))
            if not host_allowed(host, self.allowed_hosts):
                detail = f"host {host!r} is not served here (IRT_ALLOWED_HOSTS)" if host else "the request has no Host header"
                body = error_body(scope["path"], 400, detail, context.request_id)
                await self._send_json(send_tracking, 400, body)
                return
            body = await self._read_body(scope, receive)
            if body is None:
                detail = f"request body is larger than {self.max_body_bytes} bytes (IRT_MAX_BODY_BYTES)"
                body = error_body(scope["path"], 413, detail, context.request_id)
                await self._send_json(send_tracking, 413, body)
                return
            if body is CLIENT_GONE:
                status = CLIENT_CLOSED_REQUEST  # for the access log: the app never saw the request
                return
            if generation:
                watcher = asyncio.ensure_future(self._watch(receive, context))
            replayed = False

            async def receive_replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                if watcher is not None:  # the watcher owns the connection's receive channel now
                    await context.disconnected.wait()
                    return {"type": "http.disconnect"}
                return await receive()

            await self.app(scope, receive_replay, send_tracking)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                body = error_body(scope["path"], 500, internal_error(context.request_id), context.request_id)
                await self._send_json(send_tracking, 500, body)
        finally:
            if watcher is not None:
                watcher.cancel()
            duration_s = time.perf_counter() - start
            if generation:
                self.metrics.observe_request(context.outcome or status, duration_s, context.mode, context.database)
            if self.access_log:
                self._log_access(scope, status, duration_s, context)
            request_id_var.reset(token)

    async def _watch(self, receive, context: RequestContext) -> None:
        """Wait for the client to go away (after the body, the next message is a disconnect)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not context.answered:
                    context.disconnected.set()
                return

    def _log_access(self, scope, status: int, duration_s: float, context: RequestContext) -> None:
        fields = {
            "event": "access",
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(duration_s * 1e3, 3),
            "mode": context.mode,
            "database": context.database,
            "n": context.n,
        }
        if context.outcome:
            fields["outcome"] = context.outcome
        if context.disconnected.is_set():
            fields["client_disconnected"] = True
        if context.warnings:
            fields["warnings"] = context.warnings
        if context.user:
            fields["user_hash"] = user_hash(context.user)
        if self.log_prompts and context.prompt is not None:
            fields["prompt"] = context.prompt
        self.access_logger.info(
            "%s %s %s", scope["method"], scope["path"], status, extra={"fields": fields, "request_id": context.request_id}
        )

    async def _read_body(self, scope, receive) -> bytes | object | None:
        """The whole body, None when it is over the limit (checked on Content-Length first), or
        CLIENT_GONE when the connection closed before its end."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body_bytes:
                        return None
                except ValueError:
                    pass  # h11 refuses a malformed Content-Length before we get here
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return CLIENT_GONE
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    async def _send_json(send, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
