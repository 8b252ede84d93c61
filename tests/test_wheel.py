"""A normal install works: the wheel built from this checkout, installed into a fresh virtual
environment outside it, carries its templates and data, and runs `init`, `serve`, a share
over SMTP and a portal page — nothing read from the source tree."""

from __future__ import annotations

import mailbox
import os
import re
import smtplib
import subprocess
import sys
import time
import urllib.request

import pytest

from mailbridge import __version__
from tests.conftest import ROOT, SHARING, free_port
from tests.helpers import MEMBER, share_message, wire

pytestmark = pytest.mark.slow

LINK = re.compile(r"http://127\.0\.0\.1:\d+/s/[A-Za-z0-9_-]{43}")


def run(*args: str, cwd, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAILBRIDGE_", "PYTHON")) and k != "VIRTUAL_ENV"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`mailbridge` from a wheel in a virtual environment of its own, outside the checkout."""
    place = tmp_path_factory.mktemp("wheel")
    dist = place / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist),
        str(ROOT), cwd=place)
    [wheel] = list(dist.glob("mailbridge-*.whl"))
    venv = place / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=place)
    run(str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel), cwd=place)
    return place, venv / "bin" / "mailbridge", wheel


def test_the_wheel_ships_templates_and_data(installed):
    _, _, wheel = installed
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mailbridge/templates/email/link.txt", "mailbridge/templates/portal/library.html",
            "mailbridge/web/data/common_passwords.txt", "mailbridge/web/static/portal.css",
            "mailbridge/mail/mime.py"} <= names
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


def test_installed_mailbridge_prints_its_version(installed):
    place, mailbridge, _ = installed
    printed = run(str(mailbridge), "--version", cwd=place).strip()
    assert printed == f"mailbridge, version {__version__}"


def test_installed_mailbridge_shares_a_document_end_to_end(installed, tmp_path):
    place, mailbridge, _ = installed
    smtp_port, web_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""\
[service]
base_url = "http://127.0.0.1:{web_port}"
data_dir = "data"
[smtp]
port = {smtp_port}
[web]
port = {web_port}
[metrics]
port = 0
[addresses]
sharing = "{SHARING}"
reply_domain = "reply.portal.example"
[outbound]
from = "mailbridge@portal.example"
[senders]
require_authentication = false
[worker]
poll_seconds = 0.5
""")
    run(str(mailbridge), "--config", str(config), "init", cwd=tmp_path)
    run(str(mailbridge), "--config", str(config), "members", "add", MEMBER, "--name",
        "Jane Doe", "--clinic", "Riverside PT", cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "PYTHON"))}
    serve = subprocess.Popen([str(mailbridge), "--config", str(config), "serve"], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=5) as smtp:
                    smtp.sendmail(MEMBER, [SHARING], wire(share_message()))
                break
            except OSError:
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.3)
        outbox = tmp_path / "data" / "outbox"
        links: list[str] = []
        while not links:
            assert time.monotonic() < deadline + 30, "no link e-mail was written"
            time.sleep(0.3)
            if (outbox / "new").is_dir():
                links = [m for msg in mailbox.Maildir(outbox, create=False)
                         for m in LINK.findall(msg.as_string())]
        with urllib.request.urlopen(links[0], timeout=10) as page:
            text = page.read().decode()
        assert page.status == 200
        assert "Jane Doe at Riverside PT shared 1 document with you" in text
    finally:
        serve.terminate()
        serve.wait(timeout=30)
