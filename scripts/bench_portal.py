#!/usr/bin/env python3
"""Portal throughput: the link page (requests/s) and document downloads (MB/s), each beside a
baseline measured in the same run — a bare WSGI app on the same server (waitress, same
threads) serving the same bytes from memory — and printed as a ratio.

    .venv/bin/python scripts/bench_portal.py [--requests 2000] [--downloads 100]
        [--size-mb 1] [--clients 4] [--rounds 3] [--backend local|database]
        [--watermark] [--clients-in-server-process]

--watermark measures what stamping costs instead: the same real PDF (and a JPEG) of about
--size-mb downloaded from a clinic without watermarks and from one with them, in one run;
it prints the ratio and the milliseconds stamping adds per MB.

mailbridge's side is the real thing: the Flask app with server-side sessions, the access
check and an audit row per request, documents decrypted from the encrypted store as they
stream. Rate limiting is switched off for the run (it would measure refusals, not serving).
The clients run in a process of their own, as browsers do elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from waitress.server import create_server  # noqa: E402

from mailbridge.clock import system_clock  # noqa: E402
from mailbridge.config import load_settings  # noqa: E402
from mailbridge.runtime import build_runtime  # noqa: E402
from mailbridge.service import RESPONSE_BUFFERS  # noqa: E402
from mailbridge.shares.members import add_member  # noqa: E402
from mailbridge.store import (
    schema,  # noqa: E402
    tokens,  # noqa: E402
)
from mailbridge.store.blobs import put_bytes  # noqa: E402
from mailbridge.store.models import Account, Document, Grant, Share, WebSession  # noqa: E402
from mailbridge.web import create_app  # noqa: E402

THREADS = 8
PAGE_TEXT_BYTES = 8_700  # text per generated PDF page; --size-mb decides the page count


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app) -> tuple[object, int]:
    port = free_port()
    # The portal's own waitress buffers (`mailbridge serve`), for both servers alike.
    server = create_server(app, host="127.0.0.1", port=port, threads=THREADS,
                           **RESPONSE_BUFFERS)
    threading.Thread(target=server.run, daemon=True).start()
    return server, port


def load(port: int, path: str, total: int, clients: int, cookie: str = "") -> dict:
    """`total` GETs of `path` over `clients` keep-alive connections; bytes and latencies."""
    latencies: list[float] = []
    received = [0]
    errors: list[str] = []
    lock = threading.Lock()
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def run(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Cookie": cookie} if cookie else {}
        mine, got = [], 0
        for _ in range(n):
            start = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            mine.append(time.perf_counter() - start)
            got += len(body)
            if response.status != 200:
                errors.append(f"{path}: HTTP {response.status}")
                break
        conn.close()
        with lock:
            latencies.extend(mine)
            received[0] += got

    threads = [threading.Thread(target=run, args=(n,)) for n in per_client]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise SystemExit(f"bench_portal: FAILED: {errors[0]}")
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "mbps": received[0] / elapsed / 1e6,
            "p50": statistics.median(latencies) * 1000,
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000}


@contextlib.contextmanager
def clients_process(here: bool):
    """Runs `load` in a process of its own, as browsers are elsewhere: client threads in the
    servers' process would take turns with them for Python's one interpreter lock, and
    every read of a response would wait for a server thread to let go of it."""
    if here:
        yield load
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda *args: pool.submit(load, *args).result()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="link-page GETs")
    ap.add_argument("--downloads", type=int, default=100, help="document downloads")
    ap.add_argument("--size-mb", type=float, default=1.0, help="document size")
    ap.add_argument("--clients", type=int, default=4, help="concurrent connections")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds, each mailbridge then bare; figures are medians over rounds "
                         "(a shared machine's load swings between seconds)")
    ap.add_argument("--backend", choices=("local", "database"), default="local",
                    help="where the document is kept ([storage] backend)")
    ap.add_argument("--watermark", action="store_true",
                    help="measure watermarked downloads against plain ones instead")
    ap.add_argument("--clients-in-server-process", action="store_true",
                    help="run the client threads in the servers' process, as this benchmark "
                         "did before (they compete with the servers for the GIL)")
    args = ap.parse_args()
    if args.watermark:
        return bench_watermark(args)

    with (tempfile.TemporaryDirectory() as tmp,
          clients_process(args.clients_in_server_process) as run_load):
        settings = load_settings(None, env={
            "MAILBRIDGE_SERVICE_BASE_URL": "http://127.0.0.1",
            "MAILBRIDGE_SERVICE_DATA_DIR": tmp,
            "MAILBRIDGE_ADDRESSES_SHARING": "share@portal.example",
            "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
            "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
            "MAILBRIDGE_STORAGE_BACKEND": args.backend,
        })
        runtime = build_runtime(settings, master_key=os.urandom(32))
        schema.upgrade(runtime.db, system_clock())
        now = system_clock()
        member = add_member("jane.doe@clinic.example", "Jane Doe", "Riverside PT", now)
        document_bytes = b"%PDF-1.4\n" + os.urandom(int(args.size_mb * 1024 * 1024))
        share = Share.create(clinic=member.clinic, sender=member, title="t", created_at=now,
                             dedupe_key="bench", reply_key_hash="bench")
        blob = put_bytes(runtime.documents, document_bytes)
        document = Document.create(share=share, position=0, filename="plan.pdf", kind="pdf",
                                   content_type="application/pdf", size=blob.size,
                                   sha256=blob.sha256, blob_id=blob.blob_id,
                                   blob_key=blob.wrapped_key)
        account = Account.create(email="dr@ortho.example", password_hash="unused",  # noqa: S106
                                 created_at=now,
                                 verified_at=now)
        link_token = tokens.new_link_token()
        Grant.create(share=share, address="dr@ortho.example", state="claimed", account=account,
                     token_hash=tokens.hash_token(link_token), claimed_at=now,
                     deadline=now, created_at=now)
        sid = secrets.token_urlsafe(32)
        WebSession.create(id_hash=tokens.hash_token(sid), account=account, created_at=now,
                          last_seen_at=now)
        runtime.db.close()

        app = create_app(settings, runtime=runtime)
        app.extensions["mailbridge_limiter"].enabled = False
        server, port = serve(app)

        # The baseline serves the very bytes mailbridge sends, from memory.
        probe = http.client.HTTPConnection("127.0.0.1", port)
        probe.request("GET", f"/s/{link_token}")
        page = probe.getresponse().read()
        probe.close()

        def bare(environ, start_response):
            body = page if environ["PATH_INFO"].startswith("/s/") else document_bytes
            start_response("200 OK", [("Content-Type", "text/html"),
                                      ("Content-Length", str(len(body)))])
            return [body]

        bare_server, bare_port = serve(bare)
        cookie = f"mb_session={sid}"
        rounds: dict[str, list[dict]] = {}
        download = f"/documents/{document.id}/download"
        for _ in range(args.rounds):
            for name, result in (
                ("link page, mailbridge",
                 lambda: run_load(port, f"/s/{link_token}", args.requests, args.clients)),
                ("link page, bare WSGI",
                 lambda: run_load(bare_port, "/s/x", args.requests, args.clients)),
                ("download, mailbridge",
                 lambda: run_load(port, download, args.downloads, args.clients, cookie)),
                ("download, bare WSGI",
                 lambda: run_load(bare_port, "/d", args.downloads, args.clients)),
            ):
                rounds.setdefault(name, []).append(result())
        rows = {name: {k: statistics.median(r[k] for r in results) for k in results[0]}
                for name, results in rounds.items()}
        ratios = {what: statistics.median(
            m[key] / b[key] for m, b in zip(rounds[f"{what}, mailbridge"],
                                            rounds[f"{what}, bare WSGI"], strict=True))
            for what, key in (("link page", "rps"), ("download", "mbps"))}
        server.close()
        bare_server.close()
        runtime.db.close()

    print(f"portal benchmark: {args.requests} link-page GETs, {args.downloads} downloads of "
          f"{args.size_mb:g} MB ({args.backend} storage), {args.clients} connections, "
          f"waitress {THREADS} threads, median of {args.rounds} round(s); clients in "
          + ("the servers' process" if args.clients_in_server_process else
             "a process of their own"))
    print(f"machine: {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}")
    print()
    print(f"{'':28}{'req/s':>9}{'MB/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, r in rows.items():
        print(f"{name:28}{r['rps']:9.1f}{r['mbps']:9.1f}{r['p50']:9.1f}{r['p99']:9.1f}")
    print()
    print(f"mailbridge/bare ratio: link page {ratios['link page']:.3f} (req/s), "
          f"download {ratios['download']:.3f} (MB/s)")
    return 0


def real_pdf(size_mb: float) -> bytes:
    """A multi-page PDF of about `size_mb` with real text on every page (what stamping and text
    extraction meet in a scanned-and-OCR'd or generated report)."""
    import io

    from pypdf import PdfReader, PdfWriter

    pages = max(1, int(size_mb * 1024 * 1024 / PAGE_TEXT_BYTES))
    writer = PdfWriter()
    for n in range(pages):
        lines = [f"BT /F1 9 Tf 40 {760 - 11 * i} Td (page {n} line {i} "
                 f"{secrets.token_hex(40)}) Tj ET" for i in range(68)]
        stream = "\n".join(lines).encode()
        objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
                   b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                   b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
                   b"/Resources << /Font << /F1 5 0 R >> >> >>",
                   b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
                   b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
        body, offsets = b"%PDF-1.4\n", []
        for number, obj in enumerate(objects, 1):
            offsets.append(len(body))
            body += b"%d 0 obj\n%s\nendobj\n" % (number, obj)
        xref = len(body)
        body += b"xref\n0 6\n0000000000 65535 f \n" + b"".join(
            b"%010d 00000 n \n" % offset for offset in offsets)
        body += b"trailer << /Size 6 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
        writer.add_page(PdfReader(io.BytesIO(body)).pages[0])
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def real_jpeg(size_mb: float) -> bytes:
    import io

    from PIL import Image

    side = int((size_mb * 1024 * 1024 / 0.95) ** 0.5)  # random pixels: ~0.95 bytes each
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "JPEG",
                                                                           quality=90)
    return out.getvalue()


def bench_watermark(args) -> int:
    from mailbridge.shares import clinics

    documents = {"pdf": ("application/pdf", real_pdf(args.size_mb)),
                 "jpeg": ("image/jpeg", real_jpeg(args.size_mb))}
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, env={
            "MAILBRIDGE_SERVICE_BASE_URL": "http://127.0.0.1",
            "MAILBRIDGE_SERVICE_DATA_DIR": tmp,
            "MAILBRIDGE_ADDRESSES_SHARING": "share@portal.example",
            "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
            "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
        })
        runtime = build_runtime(settings, master_key=os.urandom(32))
        schema.upgrade(runtime.db, system_clock())
        now = system_clock()
        account = Account.create(email="dr@ortho.example", password_hash="unused",  # noqa: S106
                                 created_at=now, verified_at=now)
        paths = {}
        for clinic_name, stamped in (("Plain PT", "off"), ("Stamped PT", "on")):
            member = add_member(f"jane@{clinic_name.split()[0].lower()}.example", "Jane Doe",
                                clinic_name, now)
            clinics.change(member.clinic, clinics.Changes(watermark=stamped))
            share = Share.create(clinic=member.clinic, sender=member, created_at=now,
                                 dedupe_key=clinic_name, reply_key_hash=clinic_name)
            for position, (kind, (content_type, data)) in enumerate(documents.items()):
                blob = put_bytes(runtime.documents, data)
                document = Document.create(share=share, position=position, kind=kind,
                                           content_type=content_type, size=blob.size,
                                           sha256=blob.sha256, blob_id=blob.blob_id,
                                           blob_key=blob.wrapped_key)
                paths[(kind, stamped)] = f"/documents/{document.id}/download"
            Grant.create(share=share, address="dr@ortho.example", state="claimed",
                         account=account, token_hash=tokens.hash_token(clinic_name),
                         claimed_at=now, deadline=now, created_at=now)
        sid = secrets.token_urlsafe(32)
        WebSession.create(id_hash=tokens.hash_token(sid), account=account, created_at=now,
                          last_seen_at=now)
        runtime.db.close()
        app = create_app(settings, runtime=runtime)
        app.extensions["mailbridge_limiter"].enabled = False
        server, port = serve(app)
        cookie = f"mb_session={sid}"
        rows = {(kind, stamped): load(port, path, args.downloads, args.clients, cookie)
                for (kind, stamped), path in paths.items()}
        server.close()
        runtime.db.close()

    print(f"watermark benchmark: {args.downloads} downloads of each document, "
          f"{args.clients} connections, waitress {THREADS} threads")
    print(f"machine: {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}")
    print()
    print(f"{'':28}{'MB':>7}{'req/s':>9}{'MB/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for (kind, stamped), r in rows.items():
        name = f"{kind}, watermark {stamped}"
        size = len(documents[kind][1]) / 1e6
        print(f"{name:28}{size:7.2f}{r['rps']:9.1f}{r['mbps']:9.1f}{r['p50']:9.1f}"
              f"{r['p99']:9.1f}")
    print()
    for kind, (_, data) in documents.items():
        plain, stamped = rows[(kind, "off")], rows[(kind, "on")]
        per_mb = (stamped["p50"] - plain["p50"]) / (len(data) / 1e6)
        print(f"{kind}: watermarked/plain ratio {stamped['rps'] / plain['rps']:.3f} (downloads/s);"
              f" stamping adds {per_mb:.0f} ms per MB (p50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
