"""The HTTP service: FastAPI app, wire schemas, settings, micro-batcher, metrics and playground.

``create_app`` and ``ServiceSettings`` are imported on first use, so that importing a light
submodule (``imageragturbo.service.settings``) does not load the app, torch and the model.
"""

from __future__ import annotations

from imageragturbo.lazy import lazy_attributes

_WHERE = {"create_app": "app", "ServiceSettings": "settings"}

__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
