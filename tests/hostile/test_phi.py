"""Looking for PHI where an attacker with a copy of the database, its write-ahead log or the
service's log would look: a share whose subject, note and file name carry a marker leaves the
marker in none of them (SQLite main file + WAL; PostgreSQL: everything pg_dump writes)."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest

from mailbridge.store import sealed
from mailbridge.store.models import Document, Share
from tests.conftest import start_service
from tests.helpers import add_jane, pdf_bytes, share_message

MARKER = "MRKR-7c41f0"


def share_with_markers(running) -> None:
    add_jane()
    running.send(share_message(subject=f"Plan of care {MARKER} DOB 1950-01-01",
                               note=f"Please sign and return ({MARKER}).",
                               attachments=[(f"{MARKER}-plan.pdf", pdf_bytes(size=4000))]))
    running.sink.wait_for(2, timeout=15)
    running.drain()


@pytest.fixture
def shared(tmp_path, db_url, sink, keyring, caplog):
    caplog.set_level(logging.DEBUG)
    running = start_service(tmp_path, db_url, sink, keyring)
    try:
        share_with_markers(running)
        yield running
    finally:
        running.service.stop(timeout=10)


def test_marker_from_subject_note_and_file_name_is_nowhere_in_the_database(shared, db_url,
                                                                          caplog):
    # The portal still shows what the member wrote: it is sealed, not lost.
    share = Share.get()
    assert MARKER in sealed.share_title(shared.runtime.phi_key, share)
    assert MARKER in sealed.share_note(shared.runtime.phi_key, share)
    assert MARKER in sealed.document_name(shared.runtime.phi_key, Document.get())
    if db_url.startswith("sqlite"):
        path = db_url[len("sqlite:///"):]
        files = [p for p in (path, f"{path}-wal", f"{path}-shm") if os.path.exists(p)]
        assert any(p.endswith("-wal") for p in files)  # the log is looked at, not skipped
        dump = b"".join(open(p, "rb").read() for p in files)
    else:
        dump = subprocess.run(["pg_dump", "--no-owner", db_url], check=True,
                              capture_output=True, timeout=60).stdout
        assert b"CREATE TABLE public.share" in dump
    assert MARKER.encode() not in dump
    assert MARKER.encode("utf-16-le") not in dump
    assert MARKER not in caplog.text


def test_marker_is_nowhere_on_disk_under_the_data_directory(shared):
    data_dir = shared.runtime.settings.service.data_dir
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert MARKER.encode() not in path.read_bytes(), path.name
        assert MARKER not in path.name
