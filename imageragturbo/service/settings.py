"""Server settings: command-line flags, else ``IRT_*`` environment variables, else defaults."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# A host name or IPv4 address, "*.example.com" (any subdomain), "[::1]" (IPv6), or "*" (any host).
HOST_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")


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
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="where the torch modules run: cpu, cuda or cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="the torch modules' precision")
    batch_invariant: bool = Field(
        True,
        description="compute every image exactly as it would be alone, in any batch (off: the stock kernels, "
        "faster batches whose images may differ by a grey level from the same request alone)",
    )
    warm_databases: bool = Field(
        True,
        description="read each database's memory-mapped arrays into the page cache at start when they fit in memory "
        "(progress in the log; arrays small enough to be copied into memory at open need nothing)",
    )
    verify_databases: bool = Field(
        True,
        description="recompute every database file's checksum and check every stored value at start; off only "
        "for stores verified elsewhere (e.g. by `imageragturbo check-database` when the image was built)",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description=(
            "intra-op threads of the worker's engine (torch's, and ONNX Runtime's); None leaves the "
            "process's setting alone (`imageragturbo serve` resolves it with default_worker_threads())"
        ),
    )
    strict_vocab: bool = Field(
        False,
        description="refuse (422) a prompt with words outside the model's vocabulary instead of warning about them",
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, le=1 << 20, description="a request line plus header fields larger than this gets 431"
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description=(
            "a request whose headers and body have not all arrived this long after its first byte (or after its "
            "connection opened) is cut: 408, counted in irt_slow_clients_total"
        ),
    )
    max_connections: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description=(
            "open connections at most; one more first closes the connection that has waited longest for its "
            "request (503 when every open connection has a request in flight)"
        ),
    )
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="comma-separated Host names this server answers ('*.example.com' for subdomains); another "
        "Host gets 400. Empty: any host",
    )
    access_log: bool = Field(True, description="one structured (JSON) log line per request")
    log_prompts: bool = Field(False, description="put the prompt in the access log line (off: prompts are not logged)")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_means_none(cls, value):
        # compose files pass `IRT_API_KEY: ${IRT_API_KEY:-}`: an empty key must mean "no key",
        # not "the empty string is the key".
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_separated_hosts(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        hosts = tuple(str(host).strip().lower() for host in value or ())
        hosts = tuple(host for host in hosts if host)
        bad = [host for host in hosts if not HOST_PATTERN.fullmatch(host)]
        if bad:
            raise ValueError(f"not a host name (give names without scheme, port or path): {', '.join(bad)}")
        return hosts

    @field_validator("threads", mode="before")
    @classmethod
    def _empty_threads_means_default(cls, value):
        # Likewise `IRT_THREADS: ${IRT_THREADS:-}`: empty means "serve picks the default".
        if isinstance(value, str) and not value.strip():
            return None
        return value


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_worker_threads(cpus: int | None = None) -> int:
    """Intra-op threads for the worker: every usable CPU but one, which stays free for the event
    loop (HTTP parsing, hand-offs, PNG encoding) and the OS; on a shared machine more threads
    wait at their barriers for cores other jobs hold (results/design-notes.md)."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, cpus - 1)


def settings_from_flags(**flags) -> ServiceSettings:
    """The settings with the flags that were given (not None) over the ``IRT_*`` variables.
    Raises ConfigError naming each bad value, flag or variable alike."""
    from pydantic import ValidationError

    from imageragturbo.errors import ConfigError

    try:
        return ServiceSettings(**{name: value for name, value in flags.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"bad server settings (flags or IRT_* variables): {problems}") from exc
