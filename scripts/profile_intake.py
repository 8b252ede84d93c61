#!/usr/bin/env python3
"""Profile intake with pyinstrument: messages are spooled through the real SMTP listener,
then the worker's and the dispatcher's work runs in this thread (as `mailbridge jobs run spool`
and `jobs run outbox` do), so the profile shows where a message's time goes between the 250
and the link e-mail at the relay. Prints its top lines; `--html DIR` also writes the page."""

from __future__ import annotations

import argparse
import os
import smtplib
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_intake import (  # noqa: E402
    HOST,
    MEMBER,
    SHARING,
    SMALL_PDF_BYTES,
    Sink,
    free_port,
    pdf_bytes,
    recipients_for,
    share_message,
)

from mailbridge.clock import system_clock  # noqa: E402
from mailbridge.config import load_settings  # noqa: E402
from mailbridge.receive.smtp import make_controller  # noqa: E402
from mailbridge.runtime import build_runtime  # noqa: E402
from mailbridge.schedule import dispatch_outbox, process_spool  # noqa: E402
from mailbridge.shares.members import add_member  # noqa: E402
from mailbridge.store import schema  # noqa: E402


def runtime_for(workdir: Path, relay_port: int, database_url: str):
    settings = load_settings(None, env={
        "MAILBRIDGE_SERVICE_BASE_URL": "http://portal.example",
        "MAILBRIDGE_SERVICE_DATA_DIR": str(workdir),
        "MAILBRIDGE_DATABASE_URL": database_url or f"sqlite:///{workdir / 'mailbridge.db'}",
        "MAILBRIDGE_ADDRESSES_SHARING": SHARING,
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
        "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
        "MAILBRIDGE_OUTBOUND_TRANSPORT": "smtp",
        "MAILBRIDGE_OUTBOUND_SMTP_HOST": HOST,
        "MAILBRIDGE_OUTBOUND_SMTP_PORT": str(relay_port),
        "MAILBRIDGE_OUTBOUND_SMTP_TLS": "none",
        "MAILBRIDGE_SMTP_HOST": HOST,
        "MAILBRIDGE_SMTP_PORT": str(free_port()),
        "MAILBRIDGE_SMTP_MAX_MESSAGES_PER_HOUR_PER_SENDER": "1000000",
        "MAILBRIDGE_SMTP_MAX_BYTES_PER_HOUR_PER_SENDER": "1000000000000",
        "MAILBRIDGE_SENDERS_REQUIRE_AUTHENTICATION": "false",
    })
    runtime = build_runtime(settings, master_key=os.urandom(32))
    schema.upgrade(runtime.db, system_clock())
    add_member(MEMBER, "Bench Staff", "Bench Clinic", system_clock())
    return runtime


def spool_over_smtp(runtime, messages: list[bytes], connections: int) -> None:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mailbridge-smtp")
    controller = make_controller(runtime, executor)
    controller.start()
    try:
        def session(first: int) -> None:
            with smtplib.SMTP(HOST, runtime.settings.smtp.port, timeout=60) as smtp:
                for i in range(first, len(messages), connections):
                    smtp.sendmail(MEMBER, [SHARING], messages[i])

        threads = [threading.Thread(target=session, args=(k,)) for k in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        controller.stop()
        executor.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--database", default="", help="a database URL (default: SQLite in a "
                    "temporary directory); its tables are created, so use a throwaway one")
    ap.add_argument("--lines", type=int, default=40, help="lines of each profile to print")
    ap.add_argument("--html", type=Path, help="also write the HTML profiles into this folder")
    args = ap.parse_args()
    from pyinstrument import Profiler

    messages = [share_message(rs, pdf_bytes(f"bench {i}", SMALL_PDF_BYTES), f"Bench {i}")
                for i, rs in enumerate(recipients_for(i, 1) for i in range(args.messages))]
    with tempfile.TemporaryDirectory(prefix="mailbridge-profile-") as tmp, Sink() as sink:
        runtime = runtime_for(Path(tmp), sink.port, args.database)
        started = time.monotonic()
        spool_over_smtp(runtime, messages, args.connections)
        smtp_seconds = time.monotonic() - started
        profiler = Profiler(interval=0.001)
        profiler.start()
        processed = process_spool(runtime)
        sent = dispatch_outbox(runtime)
        profiler.stop()
        runtime.db.close()
    session = profiler.last_session
    print(f"{args.messages} messages spooled over SMTP in {smtp_seconds:.2f} s; worker + "
          f"dispatcher in one thread: {processed} processed, {sent} e-mails sent in "
          f"{session.duration:.2f} s ({session.duration / processed * 1000:.1f} ms a message)")
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    print("\n".join(text.splitlines()[:args.lines]))
    if args.html:
        args.html.mkdir(parents=True, exist_ok=True)
        (args.html / "worker.html").write_text(profiler.output_html())
    return 0


if __name__ == "__main__":
    sys.exit(main())
