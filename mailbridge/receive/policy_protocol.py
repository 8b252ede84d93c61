"""Postfix's SMTP access policy delegation protocol: the wire format and an asyncio server.

Postfix (`check_policy_service inet:host:port`) sends one request per recipient as
`name=value` lines ended by an empty line and waits for `action=<what to do>` and an empty
line; a connection carries any number of requests (postfix.org, SMTPD_POLICY_README). What to
answer is not decided here: the server calls an injected synchronous `decide(request)` in a
thread pool, so database work stays off the event loop.

The peer is meant to be the MTA, but the port is a socket like any other: line length,
attribute count, connections and idle time are capped. A request that breaks the protocol is
answered `DEFER_IF_PERMIT` (the client is told to try later, never given a permanent verdict
by accident) and its connection is closed. A `decide` that fails or returns something
unsendable also answers `DEFER_IF_PERMIT`, keeping the connection: that is our trouble, not
the client's.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from concurrent.futures import Executor

log = logging.getLogger(__name__)

REQUEST_TYPE = "smtpd_access_policy"
MALFORMED = "DEFER_IF_PERMIT 4.3.0 Malformed policy request"
UNAVAILABLE = "DEFER_IF_PERMIT 4.3.0 Policy service temporarily unavailable"

MAX_LINE_BYTES = 2048      # Postfix's longest attributes (certificate subjects) fit easily
MAX_ATTRIBUTES = 100       # Postfix 3.7 sends about 30
MAX_ACTION_CHARS = 1000
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_ACTION = re.compile(r"[\x20-\x7e]+")

Decide = Callable[[dict[str, str]], str]


class MalformedRequest(ValueError):
    """The peer broke the protocol; the reason is safe to log (no attribute values)."""


def parse_request(lines: list[bytes]) -> dict[str, str]:
    """The attributes of one request (its lines without the ending empty line)."""
    if not lines:
        raise MalformedRequest("empty request")
    if len(lines) > MAX_ATTRIBUTES:
        raise MalformedRequest(f"more than {MAX_ATTRIBUTES} attributes")
    request: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedRequest(f"line {number} is not UTF-8") from None
        name, sep, value = text.partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise MalformedRequest(f"line {number} is not name=value")
        if name in request:
            raise MalformedRequest(f"attribute {name} repeated")
        if any(ch in value for ch in "\x00\r\n"):
            raise MalformedRequest(f"attribute {name} holds a control character")
        request[name] = value
    if request.get("request") != REQUEST_TYPE:
        raise MalformedRequest("not an smtpd_access_policy request")
    return request


def format_response(action: str) -> bytes:
    """`action=...` and the empty line that ends the answer."""
    return f"action={action}\n\n".encode("ascii")


def _sendable(action: object) -> bool:
    return (isinstance(action, str) and len(action) <= MAX_ACTION_CHARS
            and _ACTION.fullmatch(action) is not None and not action.startswith(" "))


class PolicyServer:
    """`server = PolicyServer("127.0.0.1", 10040, decide, executor=pool)`;
    `await server.start()` binds (port 0 picks one: read `server.port` after start),
    `await server.stop()` closes the listener and every connection."""

    def __init__(self, host: str, port: int, decide: Decide, *, executor: Executor,
                 max_connections: int = 200, idle_timeout: float = 330.0,
                 request_timeout: float = 10.0) -> None:
        # Postfix drops idle policy connections itself after smtpd_policy_service_max_idle
        # (300 s): our idle limit is longer, so we do not cut connections it still uses.
        self.host, self.port = host, port
        self.decide = decide
        self.executor = executor
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self.requests_answered = 0

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        # `limit` caps what readuntil() buffers: a longer line is refused, never stored.
        self._server = await asyncio.start_server(self._connection, self.host, self.port,
                                                  limit=MAX_LINE_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= self.max_connections:
            log.warning("policy service: connection refused, %d connections open",
                        len(self._connections))
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await self._request(reader)
            except MalformedRequest as exc:
                await self._refuse(writer, str(exc))
                return
            if request is None:
                return  # closed or idle between requests: Postfix reconnects when it needs us
            action = await self._decision(request)
            self.requests_answered += 1  # counted before the peer can see the answer
            writer.write(format_response(action))
            await writer.drain()

    async def _request(self, reader: asyncio.StreamReader) -> dict[str, str] | None:
        """The next request; None when the peer closed or stayed idle between requests."""
        try:
            first = await asyncio.wait_for(self._line(reader), self.idle_timeout)
        except TimeoutError:
            return None
        if first is None:
            return None
        try:
            lines = await asyncio.wait_for(self._rest(reader, first), self.request_timeout)
        except TimeoutError:
            raise MalformedRequest("request not completed in time") from None
        return parse_request(lines)

    async def _line(self, reader: asyncio.StreamReader) -> bytes | None:
        """One line without its ending; None at a clean end of input."""
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise MalformedRequest("connection closed inside a request") from None
            return None
        except asyncio.LimitOverrunError:
            raise MalformedRequest(f"line longer than {MAX_LINE_BYTES} bytes") from None
        return line.rstrip(b"\n").removesuffix(b"\r")

    async def _rest(self, reader: asyncio.StreamReader, first: bytes) -> list[bytes]:
        lines: list[bytes] = []
        line: bytes | None = first
        while line:  # an empty line ends the request
            lines.append(line)
            if len(lines) > MAX_ATTRIBUTES:
                raise MalformedRequest(f"more than {MAX_ATTRIBUTES} attributes")
            line = await self._line(reader)
            if line is None:
                raise MalformedRequest("connection closed inside a request")
        return lines

    async def _decision(self, request: dict[str, str]) -> str:
        loop = asyncio.get_running_loop()
        try:
            action = await loop.run_in_executor(self.executor, self.decide, request)
        except Exception:
            log.exception("policy service: the decision failed; answering DEFER_IF_PERMIT")
            return UNAVAILABLE
        if not _sendable(action):
            log.error("policy service: the decision returned an unsendable action; "
                      "answering DEFER_IF_PERMIT")
            return UNAVAILABLE
        return action

    async def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        peer = writer.get_extra_info("peername")
        log.warning("policy service: malformed request from %s: %s", peer, reason)
        try:
            writer.write(format_response(MALFORMED))
            await writer.drain()
        except ConnectionError:
            pass
