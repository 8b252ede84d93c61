#!/usr/bin/env python3
"""Revocation latency: from the `250` that accepts a member's `revoke` reply to the first portal
request the recipient's open session gets refused, over many runs (p50/p99).

    .venv/bin/python scripts/bench_revoke.py [--runs 50]

A real `mailbridge serve` (SQLite; relay = an in-process aiosmtpd sink) gets one share per
run. Each recipient has claimed their share and is signed in (session rows written directly,
as the portal would after sign-in). Each run sends `revoke` to the share's reply address and
then downloads the document over one keep-alive connection in a tight loop until refused.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import secrets
import smtplib
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aiosmtpd.controller import Controller  # noqa: E402
from bench_intake import (  # noqa: E402
    HOST,
    MEMBER,
    SHARING,
    BenchError,
    Instance,
    free_port,
    log_tail,
    pdf_bytes,
    percentile,
    run_benchmark,
    set_up,
    share_message,
    start_serve,
    write_config,
)

from mailbridge.clock import system_clock  # noqa: E402
from mailbridge.config import load_settings, read_master_key  # noqa: E402
from mailbridge.runtime import build_runtime  # noqa: E402
from mailbridge.store import tokens  # noqa: E402
from mailbridge.store.models import Account, Grant, Share, WebSession  # noqa: E402

REPLY_TO = re.compile(r"reply\+[0-9a-f]{40}@[^\s>]+")
# The recipients never sign in with a password (their sessions are written directly); a
# stored value no password hashes to keeps the accounts unusable otherwise.
NO_PASSWORD = "!"  # noqa: S105 - not a secret


class Sink:
    """aiosmtpd in a thread that keeps the receipts (to the member) it accepts."""

    def __init__(self) -> None:
        self.port = free_port()
        self._receipts: list[EmailMessage] = []
        self._cond = threading.Condition()
        self._controller = Controller(self, hostname=HOST, port=self.port)

    async def handle_DATA(self, server, session, envelope):
        if [a.lower() for a in envelope.rcpt_tos] == [MEMBER]:
            msg = BytesParser(policy=policy.default).parsebytes(envelope.original_content)
            with self._cond:
                self._receipts.append(msg)
                self._cond.notify_all()
        return "250 OK"

    def receipts(self, count: int, timeout: float) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._receipts) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"only {len(self._receipts)} of {count} receipts arrived")
                self._cond.wait(min(left, 1.0))
            return list(self._receipts)

    def __enter__(self) -> Sink:
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._controller.stop()


class Target:
    """One share: its reply address, and the recipient's session and download path."""

    def __init__(self, reply_address: str, cookie: str, path: str) -> None:
        self.reply_address, self.cookie, self.path = reply_address, cookie, path


# --- setting up ----------------------------------------------------------------------------


def create_shares(mb: Instance, sink: Sink, runs: int, timeout: float) -> dict[str, str]:
    """Send one share per run; returns {receipt Message-ID: reply address}."""
    with smtplib.SMTP(HOST, mb.smtp_port, timeout=timeout) as smtp:
        for i in range(runs):
            raw = share_message([f"dr.revoke{i}@ortho.example"], pdf_bytes(f"r{i}", 4000),
                                f"Revoke bench {i}")
            smtp.sendmail(MEMBER, [SHARING], raw)
    receipts = sink.receipts(runs, timeout)
    return {str(r["Message-ID"]): REPLY_TO.search(str(r["Reply-To"])).group(0)
            for r in receipts}


def sign_in_recipients(config: Path, replies: dict[str, str]) -> list[Target]:
    """Each recipient claims their share and gets a portal session, written to the service's
    own database (SQLite in WAL mode takes the second writer)."""
    settings = load_settings(config, env={})
    runtime = build_runtime(settings, master_key=read_master_key(settings, env={}))
    targets = []
    with runtime.db.atomic():
        for share in Share.select().order_by(Share.id):
            grant = share.grants.get()
            now = system_clock()
            account = Account.create(email=grant.address, password_hash=NO_PASSWORD, created_at=now,
                                     verified_at=now)
            Grant.update(state="claimed", account=account, claimed_at=now).where(
                Grant.id == grant.id).execute()
            sid = secrets.token_urlsafe(32)
            WebSession.create(id_hash=tokens.hash_token(sid), account=account, data={},
                              created_at=now, last_seen_at=now)
            document = share.documents.get()
            targets.append(Target(replies[share.receipt_message_id], f"mb_session={sid}",
                                  f"/documents/{document.id}/download"))
    runtime.db.close()
    return targets


# --- one run -------------------------------------------------------------------------------


def download_status(conn: http.client.HTTPConnection, target: Target) -> int:
    conn.request("GET", target.path, headers={"Cookie": target.cookie})
    response = conn.getresponse()
    response.read()
    return response.status


def revoke_reply(reply_address: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Bench Staff <{MEMBER}>"
    msg["To"] = reply_address
    msg["Subject"] = "Re: Shared"
    msg["Message-ID"] = make_msgid(domain="clinic.example")
    msg.set_content("revoke\n")
    return msg.as_bytes(policy=policy.SMTP)


def measure(smtp_port: int, web_port: int, target: Target, timeout: float) -> tuple[float, int]:
    """Seconds from the 250 to the first refused download, and how many requests it took."""
    conn = http.client.HTTPConnection(HOST, web_port, timeout=timeout)
    try:
        if download_status(conn, target) != 200:
            raise BenchError("the recipient could not download before the revoke")
        raw = revoke_reply(target.reply_address)
        with smtplib.SMTP(HOST, smtp_port, timeout=timeout) as smtp:
            smtp.sendmail(MEMBER, [target.reply_address], raw)
            accepted = time.monotonic()  # sendmail returns once the 250 is read
        deadline = accepted + timeout
        requests = 0
        while time.monotonic() < deadline:
            status = download_status(conn, target)
            requests += 1
            if status == 404:
                return time.monotonic() - accepted, requests
            if status != 200:
                raise BenchError(f"unexpected HTTP {status} while polling")
        raise BenchError(f"the download was still served {timeout:.0f} s after the 250")
    finally:
        conn.close()


# --- report --------------------------------------------------------------------------------


def report(latencies: list[float], requests: list[int]) -> None:
    ms = [x * 1000 for x in latencies]
    print(f"mailbridge revocation latency: {len(ms)} runs, `revoke` reply 250 -> first "
          "refused download (one signed-in recipient per share, SQLite)")
    print(f"machine: {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}")
    print()
    print(f"p50 {percentile(ms, 50):.1f} ms   p99 {percentile(ms, 99):.1f} ms   "
          f"min {min(ms):.1f} ms   max {max(ms):.1f} ms   mean {statistics.fmean(ms):.1f} ms")
    print(f"downloads served after the 250 before the refusal: median "
          f"{statistics.median(requests) - 1:.0f}, max {max(requests) - 1}")


def run(args: argparse.Namespace, workdir: Path, processes: list[subprocess.Popen]) -> None:
    with Sink() as sink:
        mb = Instance(workdir / "config.toml", free_port(), workdir / "serve.log")
        write_config(mb, workdir / "data", sink.port)
        web_port = tomllib.loads(mb.config.read_text())["web"]["port"]
        set_up(mb.config)
        start_serve(mb, processes)
        try:
            replies = create_shares(mb, sink, args.runs, args.timeout)
            targets = sign_in_recipients(mb.config, replies)
            latencies, requests = [], []
            for target in targets:
                seconds, count = measure(mb.smtp_port, web_port, target, args.timeout)
                latencies.append(seconds)
                requests.append(count)
        except (BenchError, OSError, smtplib.SMTPException) as exc:
            raise BenchError(f"{exc}\n{log_tail(mb.log)}") from None
    report(latencies, requests)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds any one step may take before the run is failed")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    return args


def main() -> int:
    return run_benchmark("bench_revoke", parse_args(), run)


if __name__ == "__main__":
    sys.exit(main())
