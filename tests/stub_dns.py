"""A tiny authoritative DNS server for tests: answers TXT questions from a dictionary.

Milters such as OpenDMARC look records up with the system resolver and have no test hook for
injecting them. The suite runs such a daemon in a private mount namespace whose
`/etc/resolv.conf` names this server, which listens on a random loopback address (any of
127.0.0.0/8 works on Linux) at port 53, so concurrent runs never collide and the machine's own
resolver is left alone. Anything not in the dictionary is answered NXDOMAIN.
"""

from __future__ import annotations

import random
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT


def _loopback_address() -> str:
    return f"127.{random.randint(2, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"


class StubDns:
    """`with StubDns({"_dmarc.clinic.example": "v=DMARC1; p=reject"}) as dns:` — `dns.host`
    is where it listens (UDP port 53); `resolv_conf()` is a resolv.conf naming it."""

    def __init__(self, txt: dict[str, str] | None = None) -> None:
        self.txt = {self._key(k): v for k, v in (txt or {}).items()}
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            self.host = _loopback_address()
            try:
                self._sock.bind((self.host, 53))
                break
            except OSError:
                continue
        else:
            raise OSError("no free loopback address for the stub DNS server")
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stub-dns", daemon=True)

    @staticmethod
    def _key(name: str) -> str:
        return name.strip().rstrip(".").lower()

    def resolv_conf(self) -> str:
        return f"nameserver {self.host}\noptions timeout:1 attempts:1\n"

    def __enter__(self) -> StubDns:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                answer = self._answer(dns.message.from_wire(data))
            except Exception:  # noqa: BLE001 - a test server ignores what it cannot read
                continue
            self._sock.sendto(answer.to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = self._key(question.name.to_text())
        self.queries.append(name)
        value = self.txt.get(name)
        if value is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            data = value.encode()
            chunks = [data[i:i + 255] for i in range(0, len(data), 255)]
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, dns.rdatatype.TXT)
            rrset.add(TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks), ttl=60)
            response.answer.append(rrset)
        return response
