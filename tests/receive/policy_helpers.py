"""A PolicyServer running in a thread of its own, and a raw client for it."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from mailbridge.receive.policy_protocol import PolicyServer


class RunningPolicy:
    """`with RunningPolicy(decide, max_connections=2) as policy:` — `policy.port`."""

    def __init__(self, decide, **options) -> None:
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="decide")
        self.server = PolicyServer("127.0.0.1", 0, decide, executor=self.pool, **options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="policy-loop",
                                       daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def __enter__(self) -> RunningPolicy:
        self.thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.pool.shutdown()


def request(recipient: str = "share@portal.example", **extra: str) -> bytes:
    """A request as Postfix 3.7 sends it at RCPT (the attributes that matter here)."""
    attributes = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                  "protocol_name": "ESMTP", "client_address": "192.0.2.1",
                  "client_name": "unknown", "helo_name": "mail.clinic.example",
                  "sender": "staff@clinic.example", "recipient": recipient,
                  "recipient_count": "0", "queue_id": "", "instance": "123.456.7",
                  "size": "0", **extra}
    return "".join(f"{k}={v}\n" for k, v in attributes.items()).encode() + b"\n"


class Client:
    """A plain socket speaking to the server, as Postfix's smtpd does."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> str | None:
        """The next answer's action, or None when the server closed the connection."""
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            self.buffer += chunk
        answer, self.buffer = self.buffer.split(b"\n\n", 1)
        assert answer.startswith(b"action="), answer
        return answer.decode()[len("action="):]

    def closed(self) -> bool:
        """True when the server has closed (EOF or reset) with nothing more to read."""
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
