"""The service's logs: one JSON object a line, each with the request id of the request it is about.

Every logger under ``imageragturbo.service`` writes through one handler (stderr) with
:class:`JsonFormatter`, so a line is structured whatever the process configured for the rest
of its logging. The request id comes from the record (``extra={"request_id": ...}``, as the
worker thread passes it: a batch line names every request of the batch) or else from the
context of the request being handled (:data:`request_id_var`, set by the middleware).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

SERVICE_LOGGER = "imageragturbo.service"
ACCESS_LOGGER = "imageragturbo.service.access"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("irt_request_id", default=None)

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "fields"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", ...}``: the record's ``fields`` dict
    (access lines) and any other ``extra`` keys become keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        line.update(getattr(record, "fields", None) or {})
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_service_logging(stream=None) -> logging.Logger:
    """Give the ``imageragturbo.service`` loggers their JSON handler (once per process; later
    calls return the logger as it is). Returns the access logger."""
    service = logging.getLogger(SERVICE_LOGGER)
    if not any(getattr(handler, "_irt_json", False) for handler in service.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._irt_json = True
        service.addHandler(handler)
        service.propagate = False
        if service.level == logging.NOTSET or service.level > logging.INFO:
            service.setLevel(logging.INFO)
    return logging.getLogger(ACCESS_LOGGER)
