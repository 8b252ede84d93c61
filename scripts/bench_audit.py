#!/usr/bin/env python3
"""Audit export: events per second and peak memory of `mailbridge audit export` over a
million chained events, beside a baseline measured in the same run — the database's own
client dumping the same table to CSV (`sqlite3 -csv`, `psql \\copy`) — printed as ratios.

    .venv/bin/python scripts/bench_audit.py [--events 1000000] [--database sqlite|postgresql]
        [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

The export does more than the dump: it joins each event to its grant, share, clinic and
document, opens the sealed document name and writes both local and UTC times. Memory is the
peak resident size of each process; the export is also run over a tenth of the events, and
the two peaks are compared: constant memory means a ratio near 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailbridge.clock import system_clock  # noqa: E402
from mailbridge.config import load_settings  # noqa: E402
from mailbridge.runtime import build_runtime  # noqa: E402
from mailbridge.shares.members import add_member  # noqa: E402
from mailbridge.store import audit, schema, sealed  # noqa: E402
from mailbridge.store.models import Document, Grant, Share  # noqa: E402
from mailbridge.store.states import Audit  # noqa: E402

CONFIG = """\
[service]
base_url = "https://portal.example"
data_dir = "data"
[database]
url = "{url}"
[addresses]
sharing = "share@portal.example"
reply_domain = "reply.portal.example"
[outbound]
from = "mailbridge@portal.example"
"""
BATCH = 20_000
SHARES = 500


def fill(runtime, events: int) -> None:
    """`events` audit events over SHARES shares, each view naming a grant and a document, as
    a busy clinic's trail looks."""
    start = dt.datetime(2026, 1, 5, 8, 0)
    member = add_member("jane.doe@clinic.example", "Jane Doe", "Riverside PT", start,
                        timezone="America/New_York")
    refs = []
    with runtime.db.atomic():
        for i in range(SHARES):
            share = Share.create(clinic=member.clinic, sender=member, created_at=start,
                                 dedupe_key=f"bench-{i}", reply_key_hash=f"bench-{i}")
            document = Document.create(share=share, position=0, kind="pdf",
                                       content_type="application/pdf", size=1, sha256="0" * 64,
                                       blob_id=secrets.token_hex(16), blob_key=b"k")
            sealed.seal_document_name(runtime.phi_key, document, f"plan-of-care-{i}.pdf")
            grant = Grant.create(share=share, address=f"dr{i}@ortho.example",
                                 token_hash=secrets.token_hex(16), state="claimed",
                                 deadline=start, created_at=start)
            refs.append((share.id, grant.id, document.id))
    written = 0
    while written < events:
        n = min(BATCH, events - written)
        rows = []
        for j in range(written, written + n):
            share_id, grant_id, document_id = refs[j % SHARES]
            rows.append(dict(kind=Audit.DOCUMENT_VIEWED, at=start + dt.timedelta(seconds=j),
                             actor=f"dr{j % SHARES}@ortho.example", share=share_id,
                             grant=grant_id, document=document_id, ip="203.0.113.9",
                             user_agent="Mozilla/5.0 (Windows NT 10.0; Win64; x64)"))
        with runtime.db.atomic():
            audit.record_many(runtime.audit_key, rows)
        written += n
        print(f"\r  filling: {written:,}/{events:,} events", end="", file=sys.stderr)
    print(file=sys.stderr)


def measure(command: list[str], *, stdout=subprocess.DEVNULL, env=None) -> tuple[float, int]:
    """Wall seconds and peak resident kilobytes of one child process. The peak is the child's
    own VmHWM, read while it runs: rusage would also count this (large) parent, which a
    forked child inherits in its maximum."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, env=env)
    peak = 0
    while True:
        peak = max(peak, _high_water_kb(child.pid))
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[0]} failed: {child.stderr.read().decode()[-2000:]}")
    return elapsed, peak


def _high_water_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def export(cfg: Path, out: Path, extra: list[str] = ()) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    return measure([sys.executable, "-m", "mailbridge", "--config", str(cfg), "audit",
                    "export", "--output", str(out), *extra], env=env)


def baseline(url: str, out: Path) -> tuple[float, int]:
    if url.startswith("sqlite:///"):
        with open(out, "wb") as f:
            return measure(["sqlite3", "-csv", "-header", url[len("sqlite:///"):],
                            "SELECT * FROM audit_event ORDER BY seq"], stdout=f)
    with open(out, "wb") as f:  # COPY ... TO STDOUT: the server streams, psql writes
        return measure(["psql", "-q", url, "-c",
                        "COPY (SELECT * FROM audit_event ORDER BY seq) TO STDOUT CSV HEADER"],
                       stdout=f)


def fresh_postgres(admin_url: str) -> str:
    name = f"mailbridge_bench_{secrets.token_hex(4)}"
    subprocess.run(["psql", "-q", admin_url, "-c", f"CREATE DATABASE {name}"], check=True)
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url",
                        default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = (f"sqlite:///{root / 'data' / 'mailbridge.db'}" if args.database == "sqlite"
               else fresh_postgres(args.postgres_url))
        try:
            run(root, url, args.events)
        finally:
            if args.database == "postgresql":
                subprocess.run(["psql", "-q", args.postgres_url, "-c",
                                f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)"])


def run(root: Path, url: str, events: int) -> None:
    cfg = root / "config.toml"
    cfg.write_text(CONFIG.format(url=url))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(cfg), "init"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    runtime = build_runtime(load_settings(cfg, env={}))
    try:
        schema.upgrade(runtime.db, system_clock(), runtime)
        fill(runtime, events)
    finally:
        runtime.db.close()

    base_s, base_kb = baseline(url, root / "baseline.csv")
    ours_s, ours_kb = export(cfg, root / "export.csv")
    _, tenth_kb = export(cfg, root / "tenth.csv", ["--since", _tenth_since(events)])
    exported = sum(1 for _ in open(root / "export.csv", encoding="utf-8")) - 2
    assert exported == events, f"exported {exported} of {events} events"

    print(f"audit export, {events:,} events, {url.split(':', 1)[0]} (on {os.cpu_count()} CPUs)")
    print(f"  mailbridge audit export: {events / ours_s:12,.0f} events/s "
          f"({ours_s:6.1f} s), peak memory {ours_kb / 1024:6.1f} MiB")
    print(f"  database client dump:    {events / base_s:12,.0f} events/s "
          f"({base_s:6.1f} s), peak memory {base_kb / 1024:6.1f} MiB")
    print(f"  ratio (export/dump): speed {base_s / ours_s:.2f}, memory {ours_kb / base_kb:.2f}")
    print(f"  constant memory: peak over {events:,} events / over {events // 10:,} events = "
          f"{ours_kb / tenth_kb:.2f}")


def _tenth_since(events: int) -> str:
    """The date from which the last tenth of the events were written (one a second)."""
    start = dt.datetime(2026, 1, 5, 8, 0)
    return (start + dt.timedelta(seconds=events - events // 10)).isoformat()


if __name__ == "__main__":
    main()
