"""What a running service hands to every part: settings, database, stores, keys and clock.

Built once at start (`build_runtime`) and passed explicitly; nothing here is global.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import peewee
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mailbridge.clock import Clock, system_clock
from mailbridge.config import read_master_key
from mailbridge.metrics import Metrics
from mailbridge.settings import Settings
from mailbridge.store.blob_db import DatabaseBlobStore
from mailbridge.store.blobs import BlobStore, FallbackBlobStore, LocalBlobStore
from mailbridge.store.db import open_database


def derive_key(master_key: bytes, purpose: str) -> bytes:
    """A separate key per purpose, so one leaked derived key exposes one kind of data."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"mailbridge {purpose} v1".encode()).derive(master_key)


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    db: peewee.Database
    documents: BlobStore     # shared documents
    spool: BlobStore         # raw inbound messages (they contain the documents too)
    outbox_key: bytes        # seals rendered outbound messages in the database
    phi_key: bytes           # seals titles, notes and file names in the database
    audit_key: bytes         # chains the audit trail (HMAC)
    web_key: bytes           # signs CSRF tokens and device cookies
    metrics: Metrics         # this process's counters, and the queue gauges (for /metrics)
    clock: Clock = system_clock
    # DKIM key lookups; None means real DNS. Tests inject a resolver serving their own keys.
    dnsfunc: Callable | None = None
    wake_worker: threading.Event = field(default_factory=threading.Event)
    wake_dispatcher: threading.Event = field(default_factory=threading.Event)
    # In a worker process: tells the parent an outage started or ended (`store.outages`), so
    # the node logs it once, not once per process. None: each part logs its own.
    announce_outage: Callable[[str, str, str, float], None] | None = None


def build_runtime(settings: Settings, *, clock: Clock = system_clock,
                  dnsfunc: Callable | None = None, master_key: bytes | None = None) -> Runtime:
    key = master_key if master_key is not None else read_master_key(settings)
    db = open_database(settings.database.url)
    return Runtime(
        settings=settings,
        db=db,
        documents=blob_store(settings, db, "documents", derive_key(key, "documents")),
        spool=blob_store(settings, db, "spool", derive_key(key, "spool")),
        outbox_key=derive_key(key, "outbox"),
        phi_key=derive_key(key, "phi"),
        audit_key=derive_key(key, "audit"),
        web_key=derive_key(key, "web"),
        metrics=Metrics(db, clock),
        clock=clock,
        dnsfunc=dnsfunc,
    )


def blob_store(settings: Settings, db: peewee.Database, name: str, key: bytes,
               backend: str = "") -> BlobStore:
    """The documents or spool store of `[storage] backend` (or `backend`), falling back to the
    other backend for blobs not moved yet (`mailbridge storage migrate`). The spool follows the
    backend too: a message spooled on one node is processed by a worker on any node."""
    chosen = backend or settings.storage.backend
    other = "local" if chosen == "database" else "database"
    return FallbackBlobStore(single_blob_store(settings, db, name, key, chosen),
                             single_blob_store(settings, db, name, key, other))


def single_blob_store(settings: Settings, db: peewee.Database, name: str, key: bytes,
                      backend: str) -> BlobStore:
    """One backend's store alone, without the fallback (what a migration moves between)."""
    if backend == "database":
        return DatabaseBlobStore(db, name, key)
    folder = {"documents": settings.documents_dir, "spool": settings.spool_dir}[name]
    return LocalBlobStore(folder, key)
