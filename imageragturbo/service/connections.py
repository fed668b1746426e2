"""The HTTP/1.1 connection layer: uvicorn's httptools protocol with the limits it lacks.

uvicorn's httptools protocol (what ``http="auto"`` picks when httptools is installed) keeps
every header byte a client sends, and waits without end for headers and bodies that never
finish; ``h11_max_incomplete_event_size`` only reaches the h11 parser, ``timeout_keep_alive``
only the time between requests, and ``limit_concurrency`` counts the very connections a slow
client holds open, so it would refuse everyone else. :class:`LimitedHttpToolsProtocol` adds,
for one server (:class:`ConnectionLimits`):

* a bound on the request line plus header fields (``IRT_MAX_HEADER_BYTES``): 431, then close;
  at most one read (256 KiB) more than the bound is ever buffered;
* a read deadline (``IRT_READ_TIMEOUT_S``) from a connection's opening, or from a request's
  first byte, to its last byte: 408 (a plain close when nothing came), counted in
  ``irt_slow_clients_total{phase}``;
* a cap on open connections (``IRT_MAX_CONNECTIONS``): one more first closes the connection that
  has waited longest for its request; when every open connection has a request in flight the new
  one gets 503;
* its own error answers (400 for unparseable HTTP, 408, 431, 503) in the service's JSON shape,
  with a request id.

The app's task for a request starts once the request has arrived (or its body passed uvicorn's
read-pause mark, or the client waits for ``100 Continue``): a connection still sending its body
costs a parser, not a task, so a flood of them stays cheap.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from imageragturbo.service.metrics import ServiceMetrics
from imageragturbo.service.middleware import error_body, request_id_from

# The request line's fixed part ("METHOD ", " HTTP/1.1\r\n") and each header's ": " + CRLF.
REQUEST_LINE_OVERHEAD = 20
HEADER_OVERHEAD = 4
LINGER_S = 2.0
"""How long a connection refused mid-request (400, 431) is still read, and the bytes dropped, after
its answer: closed with unread bytes, the kernel would reset it, and a client still sending
would never read the answer."""


class ConnectionLimits:
    """One server's limits and the connections that wait for a request, oldest first."""

    def __init__(
        self,
        *,
        max_header_bytes: int,
        read_timeout_s: float,
        max_connections: int,
        metrics: ServiceMetrics,
        max_body_bytes: int | None = None,
    ):
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.metrics = metrics
        self.open: set[LimitedHttpToolsProtocol] = set()
        self.waiting: OrderedDict[LimitedHttpToolsProtocol, None] = OrderedDict()
        """Connections with no request in flight (idle, or a request still arriving): the ones to shed."""
        metrics.open_connections.set_function(lambda: len(self.open))

    def arriving(self) -> list[LimitedHttpToolsProtocol]:
        """Connections part-way into a request, or not read from yet: at shutdown each gets a
        grace to finish (http_server.ServiceServer.drain); idle kept-alive ones are not waited for."""
        return [c for c in self.open if not c._closed_by_us and not c._in_flight
                and (c._phase != "idle" or c._completed == 0)]

    def protocol_class(self) -> type[LimitedHttpToolsProtocol]:
        """The protocol class to give uvicorn (``Config(http=...)``), bound to these limits."""
        return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": self})


class _HeadersTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ConnectionLimits

    # -- the connection's life ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._phase = "idle"  # idle -> headers -> body -> (request in flight) -> idle ...
        self._head_bytes = 0
        self._completed = 0
        self._in_flight = False
        self._closed_by_us = False
        self._too_large = False
        self._deadline = None
        self._linger = None
        self._deferred = None
        limits = self.limits
        limits.open.add(self)
        if len(limits.open) > limits.max_connections:
            if limits.waiting:
                victim, _ = limits.waiting.popitem(last=False)
                limits.metrics.connections_shed.labels(reason="evicted").inc()
                victim._close()
            else:
                limits.metrics.connections_shed.labels(reason="refused").inc()
                self._answer(503, "too many open connections (IRT_MAX_CONNECTIONS); retry later", retry_after="1")
                return
        self._arm_deadline()

    def connection_lost(self, exc) -> None:
        self._deferred = None
        self._disarm_deadline()
        if self._linger is not None:
            self._linger.cancel()
        self.limits.open.discard(self)
        self.limits.waiting.pop(self, None)
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)
            self.limits.waiting.pop(self, None)
        if not self._in_flight:
            self.limits.waiting[self] = None  # (re)joins the end: it waits since now

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._in_flight:
            # A pipelined request waits behind one this server is still answering: not the client's delay.
            self._arm_deadline()
            return
        self.limits.metrics.slow_clients.labels(phase=self._phase).inc()
        if self._phase == "idle" or (self.cycle is not None and self.cycle.response_started):
            self._close()  # nothing to answer, or the app has answered already (a 413 before the body)
        else:
            detail = f"the request did not arrive within {self.limits.read_timeout_s:g} s (IRT_READ_TIMEOUT_S)"
            self._answer(408, detail)

    # -- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closed_by_us:
            return
        self._unset_keepalive_if_required()
        if self._phase == "idle":
            self._phase = "headers"
            self._arm_deadline()  # a kept-alive connection's next request starts its clock here
        completed, reading_head = self._completed, self._phase == "headers"
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no WebSocket here: the request goes on as plain HTTP
        except httptools.HttpParserError:
            if self._too_large:
                self._refuse_headers()
            else:
                self._answer(400, "invalid HTTP request: the request line or a header field could not be parsed", linger=True)
            return
        # Bytes of a head that has not ended yet: all of them are head (a read in which a request
        # ended is not counted, so the count can only fall short, by less than one read).
        if reading_head and self._phase == "headers" and self._completed == completed:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase == "idle":
            self._phase = "headers"

    def on_headers_complete(self) -> None:
        size = REQUEST_LINE_OVERHEAD + len(self.url) + sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._too_large = True
            raise _HeadersTooLarge  # stops the parser; data_received answers 431
        self._phase = "body"
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._deferred is not None and len(self._deferred[0].body) >= HIGH_WATER_LIMIT:
            self._start_deferred()  # uvicorn stops reading here until the app reads

    def on_message_complete(self) -> None:
        self._phase, self._head_bytes, self._completed = "idle", 0, self._completed + 1
        self._in_flight = True
        self._disarm_deadline()
        self.limits.waiting.pop(self, None)
        super().on_message_complete()
        self._start_deferred()

    def _start_asgi_task(self, cycle, app) -> None:
        if (
            cycle.more_body
            and not cycle.waiting_for_100_continue
            and len(cycle.body) < HIGH_WATER_LIMIT
            and not self._declares_too_much(cycle)  # the app answers 413 at once, on the header
        ):
            self._deferred = (cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def _declares_too_much(self, cycle) -> bool:
        if self.limits.max_body_bytes is None:
            return False
        for name, value in cycle.scope["headers"]:
            if name == b"content-length":
                return value.isdigit() and int(value) > self.limits.max_body_bytes
        return False

    def _start_deferred(self) -> None:
        if self._deferred is not None:
            (cycle, app), self._deferred = self._deferred, None
            super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        self._in_flight = pipelined
        if not pipelined and self._deadline is None and not self.transport.is_closing():
            # Idle between requests: uvicorn's keep-alive timer closes it, and it is the first to go at the cap.
            self.limits.waiting[self] = None

    # -- the answers this layer gives itself -------------------------------------------------

    def _refuse_headers(self) -> None:
        self.limits.metrics.oversized_headers.inc()
        detail = f"the request line and header fields are larger than {self.limits.max_header_bytes} bytes (IRT_MAX_HEADER_BYTES)"
        self._answer(431, detail, linger=True)

    def _answer(self, status: int, detail: str, *, retry_after: str | None = None, linger: bool = False) -> None:
        """Write one JSON error answer and close: the stream cannot be trusted after it."""
        context = (self.scope or {}).get("state", {}).get("irt")
        request_id = context.request_id if context is not None else request_id_from(self.headers or ())
        path = ""
        if getattr(self, "url", b""):
            try:
                path = (httptools.parse_url(self.url).path or b"").decode("ascii", "replace")
            except httptools.HttpParserInvalidURLError:
                pass
        body = json.dumps(error_body(path, status, detail, request_id)).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body))
        head.append(b"x-request-id: " + request_id.encode("ascii") + b"\r\n")
        if retry_after:
            head.append(b"retry-after: " + retry_after.encode("ascii") + b"\r\n")
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self._close(linger=linger)

    def _close(self, *, linger: bool = False) -> None:
        self._closed_by_us = True
        self._deferred = None
        self._disarm_deadline()
        self.limits.waiting.pop(self, None)
        if self.cycle is not None and not self.cycle.response_complete:
            # The app may be waiting for the rest of the body: it gets a disconnect, and its answer goes nowhere.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self.transport.is_closing():
            return
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then FIN; what the client still sends is read and dropped
            self.flow.resume_reading()
            self._linger = self.loop.call_later(min(LINGER_S, self.limits.read_timeout_s), self.transport.close)
        else:
            self.transport.close()
