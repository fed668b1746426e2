"""uvicorn, as this service runs it: the connection limits of connections.py, no WebSocket, and
a process that ends when the worker cannot serve.

A warm-up that fails (or a worker thread that dies) stops the server within a tick (0.1 s), and
:func:`run` then raises :class:`ServerStoppedError`: ``imageragturbo serve`` prints it as one
line and exits with status 2, so a supervisor restarts the process instead of keeping an
unready one whose /readyz answers 503 for ever.

At SIGTERM no request a client has already written is lost (:meth:`ServiceServer.shutdown`).
uvicorn's own shutdown closes the listening socket first, which resets the connections still in
the kernel's accept queue, and closes every connection whose request it has not parsed yet; with
the worker thread holding the CPU, the event loop can be 10-100 ms behind, and a SIGTERM then
lost up to 23 of 32 requests written just before it (results/soak.md). So before it, this server
accepts what is queued and gives every connection that is part-way into a request (or has not
been read yet) up to ``DRAIN_GRACE_S`` to finish arriving; those requests are then answered like
the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import uvicorn
from fastapi import FastAPI

from imageragturbo.errors import ImageRagTurboError
from imageragturbo.service.connections import ConnectionLimits
from imageragturbo.service.settings import ServiceSettings


logger = logging.getLogger(__name__)

DRAIN_GRACE_S = 2.0
"""At shutdown, how long connections that have not sent a whole request yet may finish it
(bounded by IRT_READ_TIMEOUT_S too). A client still writing after that has its connection closed."""
DRAIN_POLL_S = 0.01


class ServerStoppedError(ImageRagTurboError, RuntimeError):
    """The server stopped because its worker could not serve (warm-up failed, or it died)."""


class ServiceServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service, limits: ConnectionLimits):
        super().__init__(config)
        self.service = service
        self.limits = limits

    async def on_tick(self, counter: int) -> bool:
        if self.service.batcher.failure is not None:
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        if not self.force_exit and self.service.batcher.failure is None:
            await self.drain()
        await super().shutdown(sockets)

    async def drain(self) -> None:
        """Accept every connection in the listening sockets' queues, stop listening, and wait
        (up to DRAIN_GRACE_S) until no connection is still sending its request."""
        loop = asyncio.get_running_loop()
        # A duplicate of each listening socket keeps its accept queue alive after asyncio's
        # server closes the original: the queue is drained from the duplicate, then closed.
        listeners = [socket.socket(fileno=os.dup(s.fileno())) for server in self.servers for s in server.sockets]
        for server in self.servers:
            server.close()
        accepted = 0
        for listener in listeners:
            with listener:
                listener.setblocking(False)
                while True:
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        logger.warning("draining the accept queue failed", exc_info=True)
                        break
                    conn.setblocking(False)
                    await loop.connect_accepted_socket(self._protocol, conn)
                    accepted += 1
        deadline = time.monotonic() + min(DRAIN_GRACE_S, self.limits.read_timeout_s)
        while self.limits.arriving() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        left = len(self.limits.arriving())
        logger.info("shutdown: %d queued connection(s) accepted; %d request(s) still arriving are cut", accepted, left)

    def _protocol(self):
        return self.config.http_protocol_class(config=self.config, server_state=self.server_state, app_state=self.lifespan.state)


def make_server(app: FastAPI, *, host: str, port: int, settings: ServiceSettings, log_level: str = "info") -> ServiceServer:
    service = app.state.service
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        read_timeout_s=settings.read_timeout_s,
        max_connections=settings.max_connections,
        max_body_bytes=settings.max_body_bytes,
        metrics=service.metrics,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=limits.protocol_class(),
        ws="none",
        # The app writes its own structured access line (IRT_ACCESS_LOG); uvicorn's would be a second.
        access_log=False,
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
    )
    return ServiceServer(config, service, limits)


def run(app: FastAPI, *, host: str, port: int, settings: ServiceSettings, log_level: str = "info") -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then shut down gracefully: stop accepting, answer every
    request already received (each is bounded by IRT_TIMEOUT_S), drain the queue, stop the worker.
    Raises ServerStoppedError when the worker could not serve."""
    make_server(app, host=host, port=port, settings=settings, log_level=log_level).run()
    failure = app.state.service.batcher.failure
    if failure is not None:
        reason = " ".join(failure.split())  # one line, whatever the exception's message holds
        raise ServerStoppedError(f"{reason}; the server stopped (the log above has the traceback)")
