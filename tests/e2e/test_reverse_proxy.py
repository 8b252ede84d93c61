"""The README's nginx configuration, run for real in front of `serve`: a document sent back
passes (it is larger than the forms' 64 KB cap), and neither it nor a download to a slow
reader is ever written to nginx's temporary files, where it would lie on disk in clear."""

from __future__ import annotations

import ctypes
import http.client
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mailbridge.store.models import SentBack
from tests.conftest import ROOT, start_service
from tests.helpers import pdf_bytes, required_program
from tests.portal_helpers import (
    claimed_share,
    download_slowly,
    form_token,
    portal_request,
    send_back_form,
)
from tests.smtp_sink import free_port
from tests.tls_helpers import make_certificate, require_openssl

IN_CREATE = 0x100
IN_NONBLOCK = os.O_NONBLOCK


def readme_nginx(web_port: int, tls_port: int, http_port: int, cert, key) -> str:
    """The server blocks exactly as the README shows them, pointed at this test's ports and
    certificate."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```nginx\n(server \{.*?)```", readme, re.S)[1]
    replaced = (block.replace("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;")
                .replace("listen 80;", f"listen 127.0.0.1:{http_port};")
                .replace("http://127.0.0.1:8080", f"http://127.0.0.1:{web_port}")
                .replace("/etc/letsencrypt/live/portal.example/fullchain.pem", str(cert))
                .replace("/etc/letsencrypt/live/portal.example/privkey.pem", str(key)))
    assert replaced.count(str(web_port)) >= 1 and str(cert) in replaced
    return replaced


class Watch:
    """inotify on nginx's temporary directories: did any file appear in them?"""

    def __init__(self, *directories: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0
        for directory in directories:
            assert self.libc.inotify_add_watch(self.fd, str(directory).encode(), IN_CREATE) >= 0

    def created(self) -> bool:
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def behind_nginx(tmp_path, db_url, sink, keyring):
    nginx = required_program("nginx", "MAILBRIDGE_TEST_REQUIRE_NGINX", "apt-get install nginx",
                             also_in="/usr/sbin")
    require_openssl()
    running = start_service(tmp_path, db_url, sink, keyring, MAILBRIDGE_WEB_PROXIES="1")
    where = tmp_path / "nginx"
    temp = {name: where / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for directory in temp.values():
        directory.mkdir(parents=True)
    certificate = make_certificate(where, "portal")
    tls_port, http_port = free_port(), free_port()
    conf = where / "nginx.conf"
    conf.write_text("\n".join([
        "daemon off;", "worker_processes 1;", f"pid {where / 'nginx.pid'};",
        f"error_log {where / 'error.log'};",
        *(["user root;"] if os.geteuid() == 0 else []),
        "events {}", "http {", "access_log off;",
        *(f"{name}_temp_path {path};" for name, path in
          (("client_body", temp["body"]), ("proxy", temp["proxy"]),
           ("fastcgi", temp["fastcgi"]), ("uwsgi", temp["uwsgi"]), ("scgi", temp["scgi"]))),
        readme_nginx(running.service.web_port, tls_port, http_port,
                     certificate.cert, certificate.key),
        "}"]))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(where)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", tls_port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nginx did not start: {proc.stderr.read().decode()}"
                                     f"{(where / 'error.log').read_text()}") from None
            time.sleep(0.1)
    watch = Watch(temp["body"], temp["proxy"])
    try:
        yield running, tls_port, certificate, watch
    finally:
        watch.close()
        proc.terminate()
        proc.wait(10)
        running.service.stop(timeout=10)


def _https(port, certificate) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                       context=certificate.client_context())


def test_a_document_sent_back_passes_and_stays_off_nginxs_disk(behind_nginx):
    running, port, certificate, watch = behind_nginx
    rt = running.runtime
    share, sid = claimed_share(rt)
    path = f"/library/shares/{share.id}/send-back"
    status, page = portal_request(_https(port, certificate), "GET", path, sid,
                                  host="portal.example")
    assert status == 200
    body, content_type = send_back_form(form_token(page.decode()), "signed.pdf",
                                        pdf_bytes("signed", size=3 * 1024 * 1024))
    status, _ = portal_request(_https(port, certificate), "POST", path, sid, body, content_type,
                               host="portal.example")
    assert status == 302  # taken (the forms' 64 KB cap would have answered 413)
    assert SentBack.select().count() == 1
    assert not watch.created(), "nginx wrote the upload to a temporary file"


def test_a_download_to_a_slow_reader_stays_off_nginxs_disk(behind_nginx):
    running, port, certificate, watch = behind_nginx
    rt = running.runtime
    document = b"%PDF-1.4\n" + os.urandom(6 * 1024 * 1024)
    share, sid = claimed_share(rt, documents=[("plan.pdf", "pdf", "application/pdf", document)])
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with certificate.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        # mailbridge answers at once: nginx must hold what the client has not read yet.
        received = download_slowly(conn, share.documents[0].id, sid, host="portal.example")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == document
    assert not watch.created(), "nginx wrote the download to a temporary file"
