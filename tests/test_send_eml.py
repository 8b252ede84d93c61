"""scripts/send_eml.py against the real SMTP intake: documents of a real size and .eml files
saved with Unix line ends go through (SMTP reads lines by CRLF; LF alone made the whole message
one "line" and the server answered `500 Line too long`)."""

from __future__ import annotations

import secrets
import subprocess
import sys

from mailbridge.store.models import InboundMessage
from tests.conftest import ROOT
from tests.helpers import MEMBER, add_jane, pdf_bytes

SCRIPT = str(ROOT / "scripts" / "send_eml.py")


def run(service, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--port", str(service.smtp_port),
                           "--sharing", service.runtime.settings.addresses.sharing, *args],
                          capture_output=True, text=True, timeout=60)


def test_a_real_attachment_is_accepted(service, tmp_path):
    add_jane()
    document = tmp_path / "plan.pdf"
    document.write_bytes(pdf_bytes("plan", size=300_000) + secrets.token_bytes(1000))
    proc = run(service, "--from", MEMBER, "--to", "dr.smith@ortho.example", str(document))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("sent ")
    assert InboundMessage.select().count() == 1


def test_an_eml_file_with_unix_line_ends_is_sent_with_crlf(service, tmp_path):
    add_jane()
    body = "To: dr.smith@ortho.example\n\n" + "Please review.\n" * 2000
    eml = tmp_path / "message.eml"
    eml.write_bytes((f"From: {MEMBER}\nTo: share@portal.example\nSubject: Plan\n"
                     f"Message-ID: <a1@clinic.example>\n\n{body}").encode())
    proc = run(service, str(eml))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert InboundMessage.select().count() == 1
