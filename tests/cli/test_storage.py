"""`mailbridge storage migrate` as an operator runs it: the documents and spooled messages of
a running installation move into the database and back, every one still opens, a second run
has nothing to do, and backups keep working with the blobs inside the database (the SQLite
snapshot, or pg_dump on PostgreSQL, holds them)."""

from __future__ import annotations

import subprocess

from mailbridge.store.models import Blob
from tests.cli.test_backup import (
    every_document_opens,
    installation,
    new_machine,
    no_env_overrides,  # noqa: F401 - autouse: the operator's environment, not the suite's
    run_cli,
)
from tests.cli.test_cli import ok
from tests.conftest import PG_ADMIN_URL, start_service
from tests.helpers import MEMBER, pdf_bytes, share_message


def blob_files(cfg) -> list:
    data = cfg.parent / "data"
    return [p for folder in ("documents", "spool") if (data / folder).exists()
            for p in (data / folder).rglob("*") if p.is_file()]


def with_backend(cfg, backend: str) -> None:
    text = cfg.read_text().split("\n[storage]")[0]
    cfg.write_text(text + f'\n[storage]\nbackend = "{backend}"\n')


def three_shares(cfg, db_url, sink, keyring, **env) -> None:
    running = start_service(cfg.parent, db_url, sink, keyring, **env)
    try:
        for i in range(3):
            running.send(share_message(subject=f"Plan {i}", attachments=[
                (f"plan-{i}.pdf", pdf_bytes(f"plan {i}", size=300_000))]))
        running.drain()
    finally:
        running.service.stop(timeout=10)
        running.runtime.db.close()


def test_migrate_to_the_database_and_back_then_back_up(tmp_path, sink, keyring):
    live = installation(tmp_path / "live")
    ok(live, "init")
    ok(live, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    db_url = f"sqlite:///{live.parent / 'data' / 'mailbridge.db'}"
    three_shares(live, db_url, sink, keyring)
    files = len(blob_files(live))
    assert files >= 6  # three documents, three raw messages

    moved = run_cli(live, "storage", "migrate", "--to", "database")
    assert moved.returncode == 0, moved.stderr
    assert "documents: 3 moved to the database, 0 already there" in moved.stdout
    assert 'set it to "database" and restart' in moved.stdout
    assert blob_files(live) == []
    assert every_document_opens(live) == 3  # read from the database (not yet switched)
    with_backend(live, "database")
    again = run_cli(live, "storage", "migrate", "--to", "database")
    assert "documents: 0 moved" in again.stdout and "restart" not in again.stdout

    # A backup of SQLite holds the blobs inside the database snapshot; nothing is "missing".
    dest = tmp_path / "backup"
    made = run_cli(live, "backup", str(dest))
    assert made.returncode == 0 and made.stderr == "", made.stderr
    assert not (dest / "documents").exists() and (dest / "mailbridge.db").exists()
    target = new_machine(tmp_path, live.parent)
    with_backend(target, "database")
    assert "audit trail intact" in ok(target, "restore", str(dest))
    assert every_document_opens(target) == 3 and blob_files(target) == []

    back = run_cli(live, "storage", "migrate", "--to", "local")
    assert back.returncode == 0, back.stderr
    assert "documents: 3 moved to the data directory" in back.stdout
    assert len(blob_files(live)) == files
    assert every_document_opens(live) == 3


def test_on_postgresql_pg_dump_holds_the_documents(tmp_path, postgres_url, sink, keyring):
    live = installation(tmp_path / "live", postgres_url)
    with_backend(live, "database")
    db = postgres_url.rsplit("/", 1)[1]
    subprocess.run(["psql", "-q", postgres_url, "-c", "DROP SCHEMA public CASCADE; "
                    "CREATE SCHEMA public"], check=True, capture_output=True)
    ok(live, "init")
    ok(live, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    three_shares(live, postgres_url, sink, keyring, MAILBRIDGE_STORAGE_BACKEND="database")
    assert blob_files(live) == [] and Blob.select().count() >= 6

    dump = tmp_path / "mailbridge.dump"
    subprocess.run(["pg_dump", "--format=custom", f"--file={dump}", postgres_url], check=True)
    made = run_cli(live, "backup", str(tmp_path / "backup"))
    assert made.returncode == 0, made.stderr
    assert "holds the documents and spool" in made.stdout and "pg_dump" in made.stdout

    restored_db = f"{db}_blobs_restored"
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    subprocess.run(["psql", "-q", PG_ADMIN_URL, "-c", f"DROP DATABASE IF EXISTS {restored_db}",
                    "-c", f"CREATE DATABASE {restored_db}"], check=True, capture_output=True)
    try:
        subprocess.run(["pg_restore", "--no-owner", f"--dbname={base}/{restored_db}",
                        str(dump)], check=True)
        target = new_machine(tmp_path, live.parent, f"{base}/{restored_db}")
        with_backend(target, "database")
        out = ok(target, "restore", str(tmp_path / "backup"))
        assert "3 document(s)" in out and "audit trail intact" in out
        assert every_document_opens(target) == 3 and blob_files(target) == []
    finally:
        subprocess.run(["psql", "-q", PG_ADMIN_URL, "-c",
                        f"DROP DATABASE IF EXISTS {restored_db} WITH (FORCE)"],
                       capture_output=True)
