"""The `Received:` trace header SMTP intake puts on top of every message it spools (RFC 5321
§4.4): who handed it over, how (RFC 3848 protocol names: ESMTPS means over TLS), and when.
Prepending leaves DKIM signatures intact. The client's HELO name is untrusted: only the
characters of a host name or address literal are kept, so it cannot add or break headers."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from email.utils import format_datetime

_NOT_HOSTNAME = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9.\-_]")


def clean_helo(helo: str | None) -> str:
    return _NOT_HOSTNAME.sub("", helo or "")[:255] or "unknown"


def tls_comment(ssl_info: dict | None) -> str:
    """"(TLSv1.3 TLS_AES_256_GCM_SHA384)" for a connection over TLS, else ""."""
    cipher = (ssl_info or {}).get("cipher")
    if not cipher:
        return ""
    name, version = (_NOT_TOKEN.sub("", str(part or "")) for part in cipher[:2])
    return f" ({version} {name})"


def received_header(*, helo: str | None, client_ip: str, by: str, protocol: str,
                    ssl_info: dict | None = None, when: dt.datetime | None = None,
                    trace_id: str | None = None) -> bytes:
    """The header line, folded, ending in CRLF; `trace_id` defaults to a random one."""
    when = when or dt.datetime.now(dt.UTC)
    trace_id = trace_id or secrets.token_hex(8)
    ip = _NOT_HOSTNAME.sub("", client_ip) or "unknown"
    if ":" in ip:
        ip = f"IPv6:{ip}"
    return (f"Received: from {clean_helo(helo)} ([{ip}])\r\n"
            f"\tby {by} (mailbridge) with {protocol}{tls_comment(ssl_info)} id {trace_id};\r\n"
            f"\t{format_datetime(when)}\r\n").encode()
