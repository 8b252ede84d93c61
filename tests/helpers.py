"""Small builders shared by tests: members, messages, a tiny PDF, programs the suite needs."""

from __future__ import annotations

import os
import shutil
import tempfile
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from mailbridge.clock import system_clock
from mailbridge.shares.members import add_member

MEMBER = "jane.doe@clinic.example"

# The smallest config file the command line accepts (data in ./data beside it).
MINIMAL_CONFIG = """\
[service]
base_url = "http://portal.example"
data_dir = "data"

[addresses]
sharing = "share@portal.example"
reply_domain = "reply.portal.example"

[outbound]
from = "mailbridge@portal.example"
"""


def wire(raw: bytes | EmailMessage) -> bytes:
    """CRLF line ends, as every real SMTP client sends (smtplib passes bytes through as-is)."""
    data = raw if isinstance(raw, bytes) else bytes(raw)
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def pdf_bytes(marker: str = "plan of care", size: int = 0) -> bytes:
    """A small valid-looking PDF; `size` pads it to roughly that many bytes."""
    body = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
            b"% " + marker.encode() + b"\n")
    if size > len(body):
        body += b"% " + b"x" * (size - len(body) - 20) + b"\n"
    return body + b"trailer << /Root 1 0 R >>\n%%EOF\n"


def add_jane(clinic: str = "Riverside PT", timezone: str = "America/New_York"):
    return add_member(MEMBER, "Jane Doe", clinic, system_clock(), timezone=timezone)


def share_message(*, sender: str = MEMBER, recipients=("dr.smith@ortho.example",),
                  subject: str = "POC for patient R.T.", note: str = "Please review.",
                  attachments=(("plan-of-care.pdf", None),), to: str = "share@portal.example",
                  message_id: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Jane Doe <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or make_msgid(domain="clinic.example")
    msg["Date"] = "Sat, 28 Nov 2026 09:00:00 -0500"
    lines = [f"To: {', '.join(recipients)}"] if recipients else []
    msg.set_content("\n".join([*lines, "", note]) + "\n")
    for name, data in attachments:
        msg.add_attachment(data if data is not None else pdf_bytes(name), maintype="application",
                           subtype="pdf", filename=name)
    return msg


def one_page_pdf(text: str) -> bytes:
    """A minimal PDF a real viewer renders (one page of Helvetica text)."""
    stream = f"BT /F1 36 Tf 72 700 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"trailer << /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)


def required_program(name: str, flag: str, install: str, also_in: str = "") -> str:
    """The path of a program the suite needs. Missing: the test is skipped, or failed where
    `scripts/test` installed it (it sets `flag` to 1), so a green run never hides a skip."""
    found = shutil.which(name) or (shutil.which(name, path=also_in) if also_in else None)
    if found is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get(flag) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def reachable_dir(prefix: str) -> Path:
    """A fresh directory, 0755, in the system's temporary directory, that daemons running as
    their own users (postfix, dovecot) can reach. Not Python's temporary directory: while a
    portal runs in this process, that is the portal's private one (web/body_buffers.py)."""
    path = Path(tempfile.mkdtemp(prefix=prefix,
                                 dir=os.environ.get("TMPDIR") or "/tmp"))  # noqa: S108
    path.chmod(0o755)
    return path
