"""What one replica of several adds to the service's app: a header naming it on every answer,
and its Prometheus series labelled with it (served at /metrics and on a port of its own).
Used by the Ray Serve application (ray_app.py); nothing here needs Ray."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-IRT-Replica"
REPLICA_LABEL = "replica"


class ReplicaHeaderMiddleware:
    """Pure ASGI: adds ``X-IRT-Replica: <replica>`` to every HTTP answer.

    Ray's HTTP server puts an ``X-Request-ID`` into every request that has none and appends the
    request's ``X-Request-ID`` to every answer; the app sends back the same id (it takes a sane
    client id as its own), so ``proxy_adds_request_id`` drops the app's copy when it is that very
    value: one header, not two equal ones. An id the app replaced (not sane) stays."""

    def __init__(self, app, replica: str, *, proxy_adds_request_id: bool = False):
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode("latin-1"), replica.encode("latin-1"))
        self.proxy_adds_request_id = proxy_adds_request_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        if self.proxy_adds_request_id:
            headers = scope.get("headers", ())
            incoming = next((value for name, value in headers if name.lower() == b"x-request-id"), None)

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                headers = [
                    (name, value) for name, value in message.get("headers", ())
                    if incoming is None or name.lower() != b"x-request-id" or value != incoming
                ]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


class _LabelledCollector:
    """Every sample of ``registry`` with ``{label: value}`` added."""

    def __init__(self, registry, label: str, value: str):
        self.registry, self.label, self.value = registry, label, value

    def describe(self):
        return []  # no name checks: the source registry made them

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, self.label: self.value}) for s in family.samples]
            yield labelled


def labelled_registry(registry, replica: str):
    """A registry that exposes ``registry``'s series with ``replica="<replica>"``."""
    from prometheus_client import CollectorRegistry

    out = CollectorRegistry(auto_describe=False)
    out.register(_LabelledCollector(registry, REPLICA_LABEL, replica))
    return out


def start_metrics_listener(registry, host: str, base_port: int, offset: int, tries: int = 64):
    """Serve ``registry`` on ``base_port + offset`` (the next free port after it when taken);
    returns (server, port), or (None, None) when ``base_port`` is 0 or no port was free."""
    from prometheus_client import start_http_server

    if base_port == 0:
        return None, None
    for port in range(base_port + offset, min(base_port + offset + tries, 65536)):
        try:
            server, _thread = start_http_server(port, addr=host, registry=registry)
            return server, port
        except OSError:
            continue
    logger.warning("no free port for the replica's metrics from %d on; only GET /metrics answers", base_port + offset)
    return None, None
