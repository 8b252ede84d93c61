#!/usr/bin/env python3
"""Set-based jobs: how long `expire` takes over N due grants (every grant's audit event
written and chained), and `remind` over M grants in their reminder window, on SQLite or
PostgreSQL, printed with grants/s and the ratio to the goal (1,000,000 expired in 10 s).

    .venv/bin/python scripts/bench_jobs.py [--grants 1000000] [--remind 10000]
        [--database sqlite | postgresql://postgres@127.0.0.1:5432/postgres]
        [--verify] [--profile]

The grants are seeded with bulk INSERT … SELECT statements (not the share-creation path):
four grants per share, one clinic and sender. Each job runs once through `schedule.run_job`,
the code `mailbridge jobs run expire|remind` runs, in this process, timed from its call to
its return. A PostgreSQL URL names the server: a throw-away database is made on it and
dropped afterwards. `--verify` then walks the whole audit chain (`mailbridge audit verify`);
`--profile` runs `expire` under pyinstrument and prints the profile's top lines.
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

from mailbridge import schedule  # noqa: E402
from mailbridge.clock import system_clock  # noqa: E402
from mailbridge.config import load_settings  # noqa: E402
from mailbridge.runtime import build_runtime  # noqa: E402
from mailbridge.shares.members import add_member  # noqa: E402
from mailbridge.store import audit, schema  # noqa: E402
from mailbridge.store.models import AuditEvent, Grant  # noqa: E402

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
GOAL_GRANTS, GOAL_SECONDS = 1_000_000, 10.0
PER_SHARE = 4


def series(db, n: int) -> str:
    """A row source of i = 1..n in the engine's own way."""
    if "sqlite" in type(db).__name__.lower():
        return (f"(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s "  # noqa: S608
                f"WHERE i < {int(n)}) SELECT i FROM s) AS s")
    return f"generate_series(1, {int(n)}) AS s(i)"


def random_hex(db, chars: int) -> str:
    """An SQL expression: `chars` random hex digits, a new value for every row."""
    if "sqlite" in type(db).__name__.lower():
        return f"lower(hex(randomblob({chars // 2})))"
    return "(" + " || ".join(["md5(random()::text)"] * -(-chars // 32)) + f")::char({chars})"


def seed(runtime, grants: int, deadline: dt.datetime, tag: str) -> None:
    """`grants` pending grants with this deadline, PER_SHARE to a share, in two statements.
    Token hashes are random, as SHA-256 digests are, and each address has a random part:
    in sequence they would land at one end of their indexes, which real ones never do, and
    an UPDATE that writes every index entry again would look cheaper than it is."""
    db = runtime.db
    now = system_clock()
    member = add_member(f"sender-{tag}@clinic.example", "Jane Doe", "Riverside PT", now,
                        timezone="America/New_York")
    shares = -(-grants // PER_SHARE)
    p = db.param
    created = now - dt.timedelta(hours=25)
    # Times as the models write them (peewee hands datetimes to the driver as they are).
    with db.atomic():
        first = (db.execute_sql('SELECT COALESCE(MAX(id), 0) FROM "share"').fetchone()[0]) + 1
        db.execute_sql(
            'INSERT INTO "share" (clinic_id, sender_id, title_sealed, note_sealed, created_at, '  # noqa: S608
            'dedupe_key, reply_key_hash, receipt_message_id, legal_hold) '
            f"SELECT {p}, {p}, {p}, {p}, {p}, {p} || s.i, {p} || s.i, '', {p} "
            f"FROM {series(db, shares)}",
            (member.clinic_id, member.id, b"", b"", created, f"bench-{tag}-", f"bench-{tag}-",
             False))
        db.execute_sql(
            'INSERT INTO "grant" (share_id, address, token_hash, state, deadline, created_at, '  # noqa: S608
            "delivery) "
            f"SELECT {first} + (s.i - 1) / {PER_SHARE}, "
            f"{random_hex(db, 12)} || '.' || s.i || {p}, {random_hex(db, 64)}, "
            f"'pending', {p}, {p}, 'sent' FROM {series(db, grants)}",
            (f"-{tag}@ortho.example", deadline, created))
    if "sqlite" not in type(db).__name__.lower():
        db.execute_sql('ANALYZE "grant"')


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ... (fields 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu(fields: list[str], children: bool = False) -> int:
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks + (int(fields[13]) + int(fields[14]) if children else 0)  # + exited children


def server_cpu(db) -> float | None:
    """CPU seconds used so far by the PostgreSQL server (same machine): the postmaster and
    every backend, those that exited included — a job's lanes use connections of their own."""
    if "sqlite" in type(db).__name__.lower():
        return None
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    try:
        postmaster = int(_stat(pid)[1])
        ticks = _cpu(_stat(postmaster), children=True)
        for child in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split():
            try:
                ticks += _cpu(_stat(int(child)))
            except OSError:
                continue  # exited meanwhile: now in the postmaster's children's time
    except OSError:
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def timed(runtime, name: str, profile: bool = False) -> tuple[int, float, str]:
    """Runs the job once: (count, wall seconds, the CPU it used — this process's, and the
    PostgreSQL server's — and the load average, since the machine may be shared)."""
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
        profiler.start()
    server_before = server_cpu(runtime.db)
    started, cpu = time.perf_counter(), time.process_time()
    done = schedule.run_job(runtime, name)
    elapsed = time.perf_counter() - started
    used = f"CPU: this process {time.process_time() - cpu:.2f} s"
    if server_before is not None:
        after = server_cpu(runtime.db)
        used += (f", PostgreSQL server {after - server_before:.2f} s"
                 if after is not None else "")
    used += f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    if profiler is not None:
        profiler.stop()
        lines = profiler.output_text(unicode=False, color=False, show_all=False).splitlines()
        print("\n".join([f"  profile (pyinstrument) of {name}, top lines:",
                         *("    " + line for line in lines[:45])]))
    return done, elapsed, used


def run(root: Path, url: str, args) -> None:
    cfg = root / "config.toml"
    cfg.write_text(CONFIG.format(url=url))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    env["PYTHONPATH"] = str(ROOT)  # this tree's mailbridge, as imported here
    subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(cfg), "init"],
                   check=True, env=env, stdout=subprocess.DEVNULL, cwd=root)
    runtime = build_runtime(load_settings(cfg, env={}))
    engine = url.split(":", 1)[0]
    try:
        schema.upgrade(runtime.db, system_clock(), runtime)
        now = system_clock()
        started = time.perf_counter()
        seed(runtime, args.grants, now - dt.timedelta(minutes=5), "due")
        if args.remind:
            seed(runtime, args.remind, now + dt.timedelta(hours=1), "soon")
        print(f"jobs, {engine} (on {os.cpu_count()} CPUs): seeded {args.grants:,} due and "
              f"{args.remind:,} soon-due grants in {time.perf_counter() - started:.1f} s")
        before = audit.head()[0]
        expired, seconds, used = timed(runtime, "expire", args.profile)
        events = AuditEvent.select().where(AuditEvent.seq > before).count()
        left = Grant.select().where((Grant.state == "pending")
                                    & (Grant.deadline <= now)).count()
        assert expired == args.grants == events and left == 0, (expired, events, left)
        rate = expired / seconds
        goal_rate = GOAL_GRANTS / GOAL_SECONDS
        print(f"  expire: {expired:,} grants in {seconds:.2f} s = {rate:,.0f} grants/s, "
              f"{events:,} audit events; ratio to the goal ({GOAL_GRANTS:,} in "
              f"{GOAL_SECONDS:g} s): {rate / goal_rate:.2f}\n    ({used})")
        again, again_s, _ = timed(runtime, "expire")
        print(f"  expire again: {again} grants in {again_s:.3f} s (idempotent)")
        if args.remind:
            reminded, seconds, used = timed(runtime, "remind")
            assert reminded == args.remind, reminded
            print(f"  remind: {reminded:,} reminders queued in {seconds:.2f} s = "
                  f"{reminded / seconds:,.0f} grants/s\n    ({used})")
        if args.verify:
            started = time.perf_counter()
            verdict = audit.verify(runtime.audit_key)
            print(f"  audit verify: ok={verdict.ok}, {verdict.checked:,} events in "
                  f"{time.perf_counter() - started:.1f} s")
            assert verdict.ok, verdict
    finally:
        runtime.db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grants", type=int, default=1_000_000, help="due grants to expire")
    parser.add_argument("--remind", type=int, default=10_000,
                        help="grants in their reminder window (0: skip the remind run)")
    parser.add_argument("--database", default="sqlite",
                        help="sqlite, or a PostgreSQL server's URL")
    parser.add_argument("--verify", action="store_true", help="verify the audit chain after")
    parser.add_argument("--profile", action="store_true", help="profile expire (pyinstrument)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.database == "sqlite":
            run(root, f"sqlite:///{root / 'data' / 'mailbridge.db'}", args)
            return
        admin = args.database.replace("postgres://", "postgresql://", 1)
        name = f"mailbridge_bench_{secrets.token_hex(4)}"
        subprocess.run(["psql", "-q", admin, "-c", f"CREATE DATABASE {name}"], check=True)
        try:
            run(root, f"{admin.rsplit('/', 1)[0]}/{name}", args)
        finally:
            subprocess.run(["psql", "-q", admin, "-c",
                            f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=False)


if __name__ == "__main__":
    main()
