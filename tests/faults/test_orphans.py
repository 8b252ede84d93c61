"""Issue item 6: files a crash leaves without a row — a spooled message written before its
row committed, documents encrypted before their share's transaction, a half-written `.tmp`
file — are removed by `purge` once older than `[retention] orphan_hours`, and counted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.faults.harness import Sender, delivered, log_lines, settled, wait_until

pytestmark = pytest.mark.slow

HOURS_AGO = 2


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def age(paths, hours: float = HOURS_AGO) -> None:
    then = time.time() - hours * 3600
    for path in paths:
        os.utime(path, (then, then))


def test_purge_removes_old_orphaned_files_and_keeps_everything_referenced(site):
    process = site.serve()
    Sender(site, connections=1).send([0])
    wait_until(lambda: delivered(site.sink, {0}) and settled(site), "a share", 30)
    assert process.terminate()[0] == 0
    spool_dir, documents_dir = site.data_dir / "spool", site.data_dir / "documents"
    referenced = files(spool_dir) | files(documents_dir)
    assert len(referenced) == 2  # the raw message and the document

    # What a kill -9 at the wrong moment leaves behind, as the stores write it.
    runtime = site.runtime()
    try:
        spooled = runtime.spool.put([b"a message whose row never committed"])
        document = runtime.documents.put([b"a document whose share never committed"])
        fresh = runtime.documents.put([b"a document whose share is committing right now"])
    finally:
        runtime.db.close()
    folder = spooled.blob_id[:2]  # as `put` names it: .<blob id>.<mkstemp's 8 chars>.tmp
    half_written = spool_dir / folder / f".{folder}{'c' * 30}.k2j4_x9q.tmp"
    half_written.write_bytes(b"MBLB half")
    orphans = {spool_dir / spooled.blob_id[:2] / spooled.blob_id,
               documents_dir / document.blob_id[:2] / document.blob_id, half_written}
    age(referenced | orphans)  # old enough, all of them: only the rows tell them apart

    process = site.serve()  # purge runs at start
    wait_until(lambda: log_lines(process.log, "orphaned file(s)"), "the purge job", 30)
    assert " 3 orphaned file(s)," in log_lines(process.log, "purge: ")[0]
    left = files(spool_dir) | files(documents_dir)
    assert left == referenced | {documents_dir / fresh.blob_id[:2] / fresh.blob_id}

    # The command counts the same way.
    assert process.terminate()[0] == 0
    age([documents_dir / fresh.blob_id[:2] / fresh.blob_id])
    assert site.cli("jobs", "run", "purge").strip() == "purge: 1"
    assert files(spool_dir) | files(documents_dir) == referenced
