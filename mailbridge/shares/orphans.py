"""Files that no row references: a crash (`kill -9`, power loss) between writing a blob and
committing its row leaves them — a spooled message written before its row, documents
encrypted before their share's transaction, a half-written `.tmp` file. The purge job
removes them once they are older than `[retention] orphan_hours`: the margin covers a
transaction still committing, also on another node sharing the directory."""

from __future__ import annotations

import logging
import threading
import time

import peewee

from mailbridge.runtime import Runtime
from mailbridge.store.blobs import BlobStore, StorageError
from mailbridge.store.models import Document, InboundMessage

log = logging.getLogger(__name__)

BATCH = 500


def sweep(runtime: Runtime, stop: threading.Event | None = None) -> int:
    """Remove orphaned files from the spool and documents stores; returns how many."""
    # File times are wall-clock times, whatever clock the runtime keeps.
    older_than = time.time() - runtime.settings.retention.orphan_hours * 3600
    removed = 0
    for store, model in ((runtime.spool, InboundMessage), (runtime.documents, Document)):
        removed += _sweep_store(store, model, older_than, stop)
    return removed


def _sweep_store(store: BlobStore, model: type[peewee.Model], older_than: float,
                 stop: threading.Event | None) -> int:
    removed = 0
    candidates: list[str] = []
    for name, temporary in store.stale_files(older_than):
        if stop is not None and stop.is_set():
            return removed
        if temporary:
            removed += _remove(store.delete_temporary, name)
            continue
        candidates.append(name)
        if len(candidates) >= BATCH:
            removed += _remove_unreferenced(store, model, candidates)
            candidates = []
    if candidates:
        removed += _remove_unreferenced(store, model, candidates)
    return removed


def _remove_unreferenced(store: BlobStore, model: type[peewee.Model],
                         blob_ids: list[str]) -> int:
    referenced = {row.blob_id for row in model.select(model.blob_id)
                  .where(model.blob_id.in_(blob_ids))}
    return sum(_remove(store.delete, blob_id) for blob_id in blob_ids
               if blob_id not in referenced)


def _remove(delete, name: str) -> int:
    try:
        delete(name)
    except StorageError:
        log.warning("purge: could not remove an orphaned file")
        return 0
    return 1
