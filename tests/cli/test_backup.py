"""`mailbridge backup` and `mailbridge restore` as an operator uses them after losing a disk:
a backup taken while mail keeps arriving restores on another machine (its own data directory,
the master key copied by hand), every document opens and the audit chain verifies. The key is
never in a backup; a damaged backup, a different key or a used data directory is refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mailbridge.config import load_settings
from mailbridge.runtime import build_runtime
from mailbridge.store import audit, blobs, sealed
from mailbridge.store.models import Document, InboundMessage
from tests.cli.test_cli import mb, ok
from tests.conftest import PG_ADMIN_URL, ROOT, start_service
from tests.helpers import MEMBER, MINIMAL_CONFIG, pdf_bytes, share_message


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MAILBRIDGE_"):
            monkeypatch.delenv(name)


def installation(root: Path, db_url: str = "") -> Path:
    """A config file in `root` whose data directory is `root/data`."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.toml"
    extra = f'\n[database]\nurl = "{db_url}"\n' if db_url else ""
    cfg.write_text(MINIMAL_CONFIG + extra)
    return cfg


def run_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed command in its own process, as an operator runs it next to the service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    return subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(cfg), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def new_machine(tmp_path: Path, live: Path, db_url: str = "") -> Path:
    """Another installation with an empty data directory holding only the master key, copied
    from wherever the operator kept it."""
    cfg = installation(tmp_path / "new", db_url)
    (cfg.parent / "data").mkdir(mode=0o700)
    shutil.copy2(live / "data" / "master.key", cfg.parent / "data" / "master.key")
    return cfg


def share_while(running, stop: threading.Event, sent: list[int]) -> None:
    i = 0
    while not stop.is_set():
        running.send(share_message(subject=f"Plan {i}", attachments=[
            (f"plan-{i}.pdf", pdf_bytes(f"plan {i}", size=20_000))]))
        sent.append(i)
        i += 1


def every_document_opens(cfg: Path) -> int:
    runtime = build_runtime(load_settings(cfg, env={}))
    try:
        opened = 0
        for document in Document.select().where(Document.blob_key != b""):
            data = blobs.read_all(runtime.documents, document.blob_id, document.blob_key)
            assert hashlib.sha256(data).hexdigest() == document.sha256
            assert sealed.document_name(runtime.phi_key, document).startswith("plan-")
            opened += 1
        for row in InboundMessage.select().where(InboundMessage.purged_at.is_null()):
            raw = blobs.read_all(runtime.spool, row.blob_id, row.blob_key)
            assert hashlib.sha256(raw).hexdigest() == row.raw_sha256
        verdict = audit.verify(runtime.audit_key)
        assert verdict.ok and verdict.checked > 0
        return opened
    finally:
        runtime.db.close()


def test_a_backup_taken_while_mail_flows_restores_elsewhere(tmp_path, sink, keyring):
    live = installation(tmp_path / "live")
    ok(live, "init")
    ok(live, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    running = start_service(live.parent, f"sqlite:///{live.parent / 'data' / 'mailbridge.db'}",
                            sink, keyring)
    stop, sent = threading.Event(), []
    try:
        for i in range(3):
            running.send(share_message(subject=f"First {i}", attachments=[
                (f"plan-first-{i}.pdf", pdf_bytes(f"first {i}"))]))
        running.drain()
        sender = threading.Thread(target=share_while, args=(running, stop, sent))
        sender.start()
        dest = tmp_path / "backup"
        made = run_cli(live, "backup", str(dest))
        stop.set()
        sender.join(timeout=60)
        running.drain(timeout=30)
    finally:
        stop.set()
        running.service.stop(timeout=10)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"backup written to {dest}: ")
    assert "The master key is NOT in the backup" in made.stdout
    assert "master.key" in made.stdout
    assert sent, "mail kept flowing during the backup"
    assert made.stderr == ""  # no progress bar when not on a terminal
    key_text = (live.parent / "data" / "master.key").read_text().strip().encode()
    for path in dest.rglob("*"):
        assert path.is_dir() or key_text not in path.read_bytes()
        assert (path.stat().st_mode & 0o077) == 0

    target = new_machine(tmp_path, live.parent)
    out = ok(target, "restore", str(dest))
    assert "audit trail intact" in out
    opened = every_document_opens(target)
    assert opened >= 3 and f"{opened} document(s)" in out
    assert "" == ok(target, "spool", "list", "--state", "failed")


def test_a_restore_refuses_a_used_directory_a_different_key_and_a_damaged_backup(tmp_path):
    live = installation(tmp_path / "live")
    ok(live, "init")
    ok(live, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    runtime = build_runtime(load_settings(live, env={}))
    try:
        blobs.put_bytes(runtime.documents, b"a document file")
    finally:
        runtime.db.close()
    dest = tmp_path / "backup"
    ok(live, "backup", str(dest))
    result = mb(live, "backup", str(dest))
    assert result.exit_code == 2 and "Invalid value for DEST" in result.stderr
    assert "not an empty folder" in result.stderr

    result = mb(live, "restore", str(dest))  # onto the live installation itself
    assert result.exit_code == 2 and "already exists" in result.stderr

    stranger = installation(tmp_path / "stranger")
    ok(stranger, "init")
    (stranger.parent / "data" / "mailbridge.db").unlink()
    result = mb(stranger, "restore", str(dest))
    assert result.exit_code == 2 and "different master key" in result.stderr

    [blob] = [p for p in (dest / "documents").rglob("*") if p.is_file()]
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    target = new_machine(tmp_path, live.parent)
    result = mb(target, "restore", str(dest))
    assert result.exit_code == 2 and "is damaged (checksum differs)" in result.stderr
    assert not (target.parent / "data" / "mailbridge.db").exists()  # nothing half-done

    result = mb(target, "restore", str(tmp_path))
    assert result.exit_code == 2 and "is not a mailbridge backup" in result.stderr


def test_on_postgresql_the_backup_holds_the_blobs_and_pg_dump_the_rows(tmp_path, postgres_url,
                                                                       sink, keyring):
    live = installation(tmp_path / "live", postgres_url)
    db = postgres_url.rsplit("/", 1)[1]
    subprocess.run(["psql", "-q", postgres_url, "-c", "DROP SCHEMA public CASCADE; "
                    "CREATE SCHEMA public"], check=True, capture_output=True)
    ok(live, "init")
    ok(live, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    running = start_service(live.parent, postgres_url, sink, keyring)
    try:
        for i in range(3):
            running.send(share_message(subject=f"Plan {i}", attachments=[
                (f"plan-{i}.pdf", pdf_bytes(f"plan {i}"))]))
        running.drain()
    finally:
        running.service.stop(timeout=10)

    dump = tmp_path / "mailbridge.dump"
    subprocess.run(["pg_dump", "--format=custom", f"--file={dump}", postgres_url], check=True)
    made = run_cli(live, "backup", str(tmp_path / "backup"))
    assert made.returncode == 0, made.stderr
    assert "pg_dump --format=custom" in made.stdout
    assert not (tmp_path / "backup" / "mailbridge.db").exists()

    restored_db = f"{db}_restored"
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    subprocess.run(["psql", "-q", PG_ADMIN_URL, "-c", f"DROP DATABASE IF EXISTS {restored_db}",
                    "-c", f"CREATE DATABASE {restored_db}"], check=True, capture_output=True)
    try:
        subprocess.run(["pg_restore", "--no-owner", f"--dbname={base}/{restored_db}",
                        str(dump)], check=True)
        target = new_machine(tmp_path, live.parent, f"{base}/{restored_db}")
        out = ok(target, "restore", str(tmp_path / "backup"))
        assert "3 document(s)" in out and "audit trail intact" in out
        assert every_document_opens(target) == 3
    finally:
        subprocess.run(["psql", "-q", PG_ADMIN_URL, "-c",
                        f"DROP DATABASE IF EXISTS {restored_db} WITH (FORCE)"],
                       capture_output=True)
