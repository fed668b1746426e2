"""The requests of `imageragturbo bench soak`: normal ones, and faults sent on purpose.

Every kind of request is one function ``(client, i) -> outcome`` on a :class:`SoakClient` (one
per client thread). An outcome is the HTTP status as a string (``"200"``, ``"422"``), or one of
:data:`CLIENT_LEFT` (the client closed the connection before any answer, on purpose),
:data:`SERVER_CLOSED` (the connection ended without a status line), :data:`CLIENT_TIMEOUT`
and :data:`REFUSED`. Each :class:`Kind` names the outcomes that are its normal answer and those
that its fault is meant to cause; anything else is unexpected.

The well-formed kinds share the thread's keep-alive connection (``http.client``); the kinds that
misbehave at the socket level (half a body, a hang-up, headers a line at a time, a body over
the cap) each open a raw socket of their own, so that what they send is exactly what is written.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

CLIENT_LEFT = "client left"
SERVER_CLOSED = "closed, no answer"
CLIENT_TIMEOUT = "client timeout"
REFUSED = "connection refused"

OVERSIZE_PROMPT_CHARS = 4000
"""Over the schema's 1,000 characters, while the body stays under the default 16 KiB cap."""
OVERSIZE_BODY_BYTES = 64 * 1024
"""Over the default IRT_MAX_BODY_BYTES (16 KiB)."""
SLOW_HEADER_GAP_S = 0.25
"""The slow client's pause between header lines (6 pieces: about 1.25 s per request)."""
REQUEST_TIMEOUT_S = 120.0
KEEP_ALIVE_IDLE_S = 1.0
"""A keep-alive connection idle longer than this is replaced before use: the server may close an
idle connection at any moment, and a POST lost to that race is the client's, not the server's."""


@dataclass(frozen=True)
class Kind:
    name: str
    what: str
    """What it sends, for the report."""
    normal: frozenset[str]
    """Outcomes that are a normal answer."""
    on_purpose: frozenset[str]
    """Outcomes its fault is meant to cause."""

    def classify(self, outcome: str) -> str:
        """``normal``, ``on purpose`` or ``unexpected``."""
        if outcome in self.normal:
            return "normal"
        return "on purpose" if outcome in self.on_purpose else "unexpected"


def _kind(name: str, what: str, normal: tuple[str, ...] = (), on_purpose: tuple[str, ...] = ()) -> Kind:
    return Kind(name, what, frozenset(normal), frozenset(on_purpose))


KINDS = {
    kind.name: kind
    for kind in (
        _kind("normal", "a valid request (prompt, seed, one of the served databases in turn)", normal=("200",)),
        _kind("malformed_json", "a body cut off in the middle of its JSON", on_purpose=("422",)),
        _kind("wrong_types", 'seed as a string, steps as true ("3", true)', on_purpose=("422",)),
        _kind("oversize_prompt", f"a prompt of {OVERSIZE_PROMPT_CHARS:,} characters (the limit is 1,000)",
              on_purpose=("422",)),
        _kind("oversize_body", f"a {OVERSIZE_BODY_BYTES // 1024} KiB body (over IRT_MAX_BODY_BYTES, 16 KiB by default)",
              on_purpose=("413",)),
        _kind("unknown_database", "a database the server does not have", on_purpose=("404",)),
        _kind("disconnect_mid_body", "headers and half the body, then the connection closed", on_purpose=(CLIENT_LEFT,)),
        _kind("disconnect_waiting", "a whole valid request, then the connection closed 5-50 ms later, before the answer",
              on_purpose=(CLIENT_LEFT,)),
        _kind("slow_headers", f"a valid request whose header lines come {SLOW_HEADER_GAP_S:g} s apart",
              normal=("200",), on_purpose=("408", SERVER_CLOSED)),
    )
}

SCHEDULE = (
    "normal", "malformed_json", "normal", "wrong_types", "normal", "oversize_prompt", "normal", "unknown_database",
    "normal", "disconnect_waiting", "normal", "slow_headers", "normal", "oversize_body", "normal",
    "disconnect_mid_body", "normal", "normal", "normal", "normal",
)
"""Request i is of kind SCHEDULE[i % 20]: 12 normal requests in 20, and each fault once."""


def kind_of(i: int) -> str:
    return SCHEDULE[i % len(SCHEDULE)]


class SoakClient:
    """One client thread's connection to the server and the bodies it sends."""

    def __init__(self, host: str, port: int, prompts: tuple[str, ...], databases: list[str], headers: dict[str, str]):
        self.host, self.port = host, port
        self.prompts = prompts
        self.databases = databases
        self.headers = {"Content-Type": "application/json", **headers}
        self.connection: http.client.HTTPConnection | None = None
        self.last_used = 0.0

    # -- bodies ----------------------------------------------------------------------------

    def body(self, i: int) -> dict:
        body: dict = {"prompt": self.prompts[i % len(self.prompts)], "seed": i}
        if self.databases:
            body["database"] = self.databases[(i // len(SCHEDULE)) % len(self.databases)]
        return body

    def body_bytes(self, i: int) -> bytes:
        return json.dumps(self.body(i)).encode()

    # -- the keep-alive connection ------------------------------------------------------------

    def exchange(self, payload: bytes) -> str:
        """POST ``payload`` on the thread's keep-alive connection; the outcome."""
        if self.connection is not None and time.monotonic() - self.last_used > KEEP_ALIVE_IDLE_S:
            self.close()
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            self.connection.request("POST", "/generate", payload, self.headers)
            response = self.connection.getresponse()
            response.read()
            outcome = str(response.status)
            if response.will_close:
                self.close()
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome to count
            self.close()
            outcome = failure_outcome(exc)
        self.last_used = time.monotonic()
        return outcome

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    # -- raw sockets ----------------------------------------------------------------------------

    def head(self, length: int) -> list[bytes]:
        """The request line and header lines of a POST /generate, the blank line last."""
        lines = ["POST /generate HTTP/1.1\r\n", f"Host: {self.host}:{self.port}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in self.headers.items()]
        lines += [f"Content-Length: {length}\r\n", "Connection: close\r\n", "\r\n"]
        return [line.encode("latin-1") for line in lines]

    def open_socket(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=REQUEST_TIMEOUT_S)


def failure_outcome(exc: BaseException) -> str:
    """The outcome of an exchange that raised ``exc`` (no status line came)."""
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return CLIENT_TIMEOUT
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return SERVER_CLOSED
    return f"client error ({type(exc).__name__})"


def read_answer(sock: socket.socket) -> str:
    """The status of the answer on ``sock`` (read whole), or the failure's outcome."""
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return str(response.status)
    except Exception as exc:  # noqa: BLE001
        return failure_outcome(exc)
    finally:
        sock.close()


# -- the kinds ---------------------------------------------------------------------------------


def normal(client: SoakClient, i: int) -> str:
    return client.exchange(client.body_bytes(i))


def malformed_json(client: SoakClient, i: int) -> str:
    payload = client.body_bytes(i)
    return client.exchange(payload[: len(payload) // 2])


def wrong_types(client: SoakClient, i: int) -> str:
    return client.exchange(json.dumps({**client.body(i), "seed": str(i), "steps": True}).encode())


def oversize_prompt(client: SoakClient, i: int) -> str:
    prompt = ("a red circle " * (OVERSIZE_PROMPT_CHARS // 13 + 1))[:OVERSIZE_PROMPT_CHARS]
    return client.exchange(json.dumps({**client.body(i), "prompt": prompt}).encode())


def unknown_database(client: SoakClient, i: int) -> str:
    return client.exchange(json.dumps({**client.body(i), "database": "no-such-database"}).encode())


def oversize_body(client: SoakClient, i: int) -> str:
    payload = json.dumps({**client.body(i), "prompt": "a" * OVERSIZE_BODY_BYTES}).encode()
    try:
        sock = client.open_socket()
    except OSError as exc:
        return failure_outcome(exc)
    try:
        sock.sendall(b"".join(client.head(len(payload))) + payload)
    except OSError:
        pass  # the server may answer 413 and close before the whole body is in: read what it said
    return read_answer(sock)


def disconnect_mid_body(client: SoakClient, i: int) -> str:
    payload = client.body_bytes(i)
    try:
        with client.open_socket() as sock:
            sock.sendall(b"".join(client.head(len(payload))) + payload[: len(payload) // 2])
            time.sleep(0.02)
    except OSError as exc:
        return failure_outcome(exc)
    return CLIENT_LEFT


def disconnect_waiting(client: SoakClient, i: int) -> str:
    payload = client.body_bytes(i)
    try:
        with client.open_socket() as sock:
            sock.sendall(b"".join(client.head(len(payload))) + payload)
            time.sleep(0.005 + (i * 7919 % 46) / 1000)  # 5-50 ms: queued, or running, or (rarely) answered
    except OSError as exc:
        return failure_outcome(exc)
    return CLIENT_LEFT


def slow_headers(client: SoakClient, i: int) -> str:
    payload = client.body_bytes(i)
    try:
        sock = client.open_socket()
    except OSError as exc:
        return failure_outcome(exc)
    try:
        for j, line in enumerate(client.head(len(payload))):
            if j:
                time.sleep(SLOW_HEADER_GAP_S)
            sock.sendall(line)
        sock.sendall(payload)
    except OSError:
        pass  # the server gave up on us: read whatever it said before it closed
    return read_answer(sock)


SENDERS: dict[str, Callable[[SoakClient, int], str]] = {
    "normal": normal,
    "malformed_json": malformed_json,
    "wrong_types": wrong_types,
    "oversize_prompt": oversize_prompt,
    "oversize_body": oversize_body,
    "unknown_database": unknown_database,
    "disconnect_mid_body": disconnect_mid_body,
    "disconnect_waiting": disconnect_waiting,
    "slow_headers": slow_headers,
}
assert set(SENDERS) == set(KINDS) == set(SCHEDULE)
