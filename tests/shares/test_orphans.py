"""The purge job's sweep of files no row references (left by a crash): old ones go, fresh
ones and referenced ones stay."""

from __future__ import annotations

import os
import time

from mailbridge.receive import spool
from mailbridge.shares import orphans, purge
from tests.helpers import MEMBER, share_message, wire


def files(runtime) -> set[str]:
    return {p.name for root in (runtime.settings.spool_dir, runtime.settings.documents_dir)
            for p in root.rglob("*") if p.is_file()}


def age_all(runtime, hours: float = 2) -> None:
    then = time.time() - hours * 3600
    for root in (runtime.settings.spool_dir, runtime.settings.documents_dir):
        for path in root.rglob("*"):
            if path.is_file():
                os.utime(path, (then, then))


def test_old_unreferenced_files_and_stale_temporaries_are_removed(runtime):
    kept = spool.enqueue(runtime, wire(share_message()), channel="smtp", envelope_from=MEMBER,
                         envelope_to=["share@portal.example"])
    orphan_raw = runtime.spool.put([b"no row"])
    orphan_doc = runtime.documents.put([b"no share"])
    temporary = (runtime.settings.documents_dir / orphan_doc.blob_id[:2]
                 / f".{orphan_doc.blob_id[:2]}{'0' * 30}.abcd_123.tmp")
    temporary.write_bytes(b"half")
    age_all(runtime)
    fresh = runtime.documents.put([b"a share committing right now"])

    assert purge.purge(runtime) == 3
    assert files(runtime) == {kept.blob_id, fresh.blob_id}
    assert orphan_raw.blob_id not in files(runtime)
    assert orphans.sweep(runtime) == 0


def test_nothing_is_removed_within_the_margin(runtime):
    runtime.spool.put([b"no row yet"])
    age_all(runtime, hours=runtime.settings.retention.orphan_hours * 0.9)
    assert orphans.sweep(runtime) == 0
