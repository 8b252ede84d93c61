"""Blobs kept in the database, on real SQLite and PostgreSQL: the same round trips and tamper
checks as the files, streaming both ways in bounded memory, and moving blobs between the two
backends with an interruption in the middle."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Iterator

import pytest

from mailbridge.runtime import blob_store, derive_key, single_blob_store
from mailbridge.store import blob_migrate
from mailbridge.store.blob_db import DatabaseBlobStore
from mailbridge.store.blob_format import BlobNotFound, StorageError
from mailbridge.store.blobs import LocalBlobStore, put_bytes, read_all
from mailbridge.store.models import Blob, BlobChunk

CHUNK = 64


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def store(runtime, key) -> DatabaseBlobStore:
    return DatabaseBlobStore(runtime.db, "documents", key, chunk_size=CHUNK)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
def test_round_trip_with_digest_and_size(store, size):
    data = os.urandom(size)
    blob = put_bytes(store, data)
    assert read_all(store, blob.blob_id, blob.wrapped_key) == data
    assert (blob.size, blob.sha256) == (size, hashlib.sha256(data).hexdigest())
    rows = BlobChunk.select().where(BlobChunk.blob == blob.blob_id).count()
    assert rows == max(1, -(-size // CHUNK))  # one row per record


def test_rows_hold_no_plaintext_and_stores_are_apart(runtime, store, key):
    data = b"Plan of care for R.T. " * 20
    blob = put_bytes(store, data)
    stored = b"".join(bytes(c.data) for c in BlobChunk.select())
    assert b"Plan of care" not in stored and len(stored) > len(data)
    spool = DatabaseBlobStore(runtime.db, "spool", key)
    assert not spool.exists(blob.blob_id) and list(spool.blob_ids()) == []
    with pytest.raises(BlobNotFound):
        spool.open(blob.blob_id, blob.wrapped_key)
    spool.delete(blob.blob_id)  # another store's blob is not this store's to delete
    assert read_all(store, blob.blob_id, blob.wrapped_key) == data


def test_delete_is_idempotent_and_missing_ids_are_errors(store):
    blob = put_bytes(store, b"x" * 300)
    store.delete(blob.blob_id)
    store.delete(blob.blob_id)
    assert BlobChunk.select().count() == 0 and Blob.select().count() == 0
    with pytest.raises(BlobNotFound):
        store.open(blob.blob_id, blob.wrapped_key)
    with pytest.raises(StorageError):
        store.open("../../etc/passwd", blob.wrapped_key)


def three_chunks(store) -> tuple[str, bytes, bytes]:
    data = os.urandom(3 * CHUNK)
    blob = put_bytes(store, data)
    return blob.blob_id, blob.wrapped_key, data


def assert_unreadable(store, blob_id, key):
    with pytest.raises(StorageError):
        read_all(store, blob_id, key)


def test_a_changed_byte_in_a_row_is_detected(store):
    blob_id, key, _ = three_chunks(store)
    row = BlobChunk.get((BlobChunk.blob == blob_id) & (BlobChunk.seq == 1))
    data = bytearray(row.data)
    data[5] ^= 1
    BlobChunk.update(data=bytes(data)).where((BlobChunk.blob == blob_id)
                                             & (BlobChunk.seq == 1)).execute()
    assert_unreadable(store, blob_id, key)


def test_a_dropped_last_row_and_swapped_rows_are_detected(store):
    blob_id, key, _ = three_chunks(store)
    last = BlobChunk.select(BlobChunk.seq).where(BlobChunk.blob == blob_id).count() - 1
    BlobChunk.delete().where((BlobChunk.blob == blob_id) & (BlobChunk.seq == last)).execute()
    assert_unreadable(store, blob_id, key)

    blob_id, key, _ = three_chunks(store)
    rows = {c.seq: bytes(c.data) for c in BlobChunk.select().where(BlobChunk.blob == blob_id)}
    for seq, other in ((0, 1), (1, 0)):
        BlobChunk.update(data=rows[other]).where((BlobChunk.blob == blob_id)
                                                 & (BlobChunk.seq == seq)).execute()
    assert_unreadable(store, blob_id, key)


def test_wrong_master_key_is_refused_before_streaming(runtime, store):
    blob_id, key, _ = three_chunks(store)
    other = DatabaseBlobStore(runtime.db, "documents", os.urandom(32))
    with pytest.raises(StorageError, match="does not unwrap"):
        other.open(blob_id, key)


def test_a_large_document_streams_both_ways_in_bounded_memory(runtime, key):
    """32 MB written as it is encrypted and read back as it is decrypted: never more than a
    few records in memory, on SQLite and on PostgreSQL."""
    store = DatabaseBlobStore(runtime.db, "documents", key)
    total = 32 * 1024 * 1024
    piece = os.urandom(100_003)
    expected = hashlib.sha256()

    def pieces() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            part = piece[: total - sent]
            expected.update(part)
            sent += len(part)
            yield part

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        blob = store.put(pieces())
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        got = hashlib.sha256()
        for chunk in store.open(blob.blob_id, blob.wrapped_key):
            got.update(chunk)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert blob.size == total
    assert got.hexdigest() == blob.sha256 == expected.hexdigest()
    assert write_peak < 8 * 1024 * 1024, write_peak
    assert read_peak < 8 * 1024 * 1024, read_peak


def test_orphan_candidates_are_blobs_older_than_the_cutoff(store):
    import time

    blob = put_bytes(store, b"an orphan")
    assert list(store.stale_files(time.time() - 3600)) == []
    assert list(store.stale_files(time.time() + 1)) == [(blob.blob_id, False)]


def test_a_blob_not_moved_yet_is_read_from_the_other_backend(runtime, key):
    store = blob_store(runtime.settings, runtime.db, "documents", key, backend="database")
    database, local = store.primary, store.previous
    assert isinstance(local, LocalBlobStore) and isinstance(database, DatabaseBlobStore)
    old = put_bytes(local, b"stored before the switch")
    assert read_all(store, old.blob_id, old.wrapped_key) == b"stored before the switch"
    new = put_bytes(store, b"stored after")
    assert database.exists(new.blob_id) and not local.exists(new.blob_id)
    store.delete(old.blob_id)
    with pytest.raises(BlobNotFound):
        store.open(old.blob_id, old.wrapped_key)


# --- moving blobs between backends ----------------------------------------------------------


class Interrupted(BaseException):
    """Stands for Ctrl-C or a crash in the middle of copying a blob."""


def interrupting(source, after_blobs: int, after_records: int):
    """`source`, whose raw stream breaks off inside the blob after `after_blobs` blobs."""
    opened = []

    class Breaking:
        def __getattr__(self, name):
            return getattr(source, name)

        def raw(self, blob_id):
            pieces = source.raw(blob_id)
            opened.append(blob_id)
            if len(set(opened)) <= after_blobs:
                return pieces

            def broken():
                for n, piece in enumerate(pieces):
                    if n == after_records:
                        raise Interrupted
                    yield piece
            return broken()

    return Breaking()


def both_stores(runtime, name):
    key = derive_key(os.urandom(32), name)
    return (single_blob_store(runtime.settings, runtime.db, name, key, "local"),
            single_blob_store(runtime.settings, runtime.db, name, key, "database"))


@pytest.mark.parametrize("direction", ["database", "local"])
def test_migrate_interrupted_in_the_middle_then_resumed(runtime, direction):
    local, database = both_stores(runtime, "documents")
    source, target = (local, database) if direction == "database" else (database, local)
    contents = [os.urandom(n) for n in (0, 10, 200_000, 300_000, 5, 1_000_000)]
    blobs = [put_bytes(source, data) for data in contents]
    ids = sorted(b.blob_id for b in blobs)
    steps = []

    with pytest.raises(Interrupted):
        blob_migrate.move_all([("documents", interrupting(source, 3, 1), target, ids)],
                              steps.append)
    assert len(steps) == 3
    moved, rest = ids[:3], ids[3:]
    assert all(target.exists(b) and not source.exists(b) for b in moved)
    assert all(source.exists(b) and not target.exists(b) for b in rest)  # nothing half-copied
    for blob, data in zip(blobs, contents, strict=True):  # all readable meanwhile
        store = target if blob.blob_id in moved else source
        assert read_all(store, blob.blob_id, blob.wrapped_key) == data

    # A crash after a copy was committed but before the source was deleted.
    target.put_raw(rest[0], source.raw(rest[0]))
    done = blob_migrate.move_all([("documents", source, target, list(source.blob_ids()))],
                                 steps.append)
    assert done["documents"].counts == {"moved": 2, "already there": 1, "gone": 0}
    assert list(source.blob_ids()) == [] and sorted(target.blob_ids()) == ids
    for blob, data in zip(blobs, contents, strict=True):
        assert read_all(target, blob.blob_id, blob.wrapped_key) == data
    again = blob_migrate.move_all([("documents", source, target, list(source.blob_ids()))],
                                  steps.append)
    assert again["documents"].counts == {"moved": 0, "already there": 0, "gone": 0}
    if direction == "local":
        assert not list(runtime.settings.documents_dir.rglob("*.tmp"))


def test_a_copy_that_reads_back_differently_keeps_the_source(runtime):
    local, database = both_stores(runtime, "spool")
    blob = put_bytes(local, b"raw message " * 100)

    class Corrupting:
        def __getattr__(self, name):
            return getattr(database, name)

        def raw(self, blob_id):
            pieces = list(database.raw(blob_id))
            pieces[-1] = pieces[-1][:-1] + bytes([pieces[-1][-1] ^ 1])
            return iter(pieces)

    with pytest.raises(StorageError, match="reads back differently"):
        blob_migrate.move(local, Corrupting(), blob.blob_id)
    assert read_all(local, blob.blob_id, blob.wrapped_key) == b"raw message " * 100
