"""The HTTP service: FastAPI app, wire schemas, settings, micro-batcher, metrics and playground."""

from imageragturbo.service.app import create_app
from imageragturbo.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
