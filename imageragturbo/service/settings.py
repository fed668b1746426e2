"""Server settings: command-line flags, else ``IRT_*`` environment variables, else defaults."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What an operator tunes. Read from ``IRT_MAX_BATCH``, ``IRT_BATCH_WAIT_MS``, ... at start-up;
    ``imageragturbo serve`` flags override them."""

    model_config = SettingsConfigDict(env_prefix="IRT_", extra="ignore", frozen=True)

    max_batch: int = Field(8, ge=1, le=256, description="most requests the worker runs as one batch")
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description=(
            "longest the worker holds a batch open for more requests; it waits only while recent "
            "batches were larger than what it has (so a lone client never waits)"
        ),
    )
    max_queue: int = Field(64, ge=1, description="requests waiting beyond this are refused with 429")
    timeout_s: float = Field(60.0, gt=0, description="a request not answered within this gets 504")
    api_key: SecretStr | None = Field(None, description="when set, POST /generate needs 'Authorization: Bearer <key>'")
    max_body_bytes: int = Field(16_384, ge=256, description="larger request bodies get 413")
    warmup: bool = Field(True, description="run one generation per mode before /readyz turns ready")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_means_none(cls, value):
        # compose files pass `IRT_API_KEY: ${IRT_API_KEY:-}`: an empty key must mean "no key",
        # not "the empty string is the key".
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value
