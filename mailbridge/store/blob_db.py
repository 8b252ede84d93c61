"""Blobs kept in the database (`[storage] backend = "database"`): every node of a cluster
reads every document with no shared filesystem. The same encrypted format as the files: the
header in a `blob` row, each sealed record in a `blob_chunk` row, written one by one as they
are encrypted and read back a few at a time while streaming, never a whole document.

Database errors are not turned into StorageError: they are the database's trouble (the caller
answers 451 or waits and retries), exactly like a failed INSERT of the row that names the blob.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import peewee

from mailbridge.store.blob_format import (
    DEFAULT_CHUNK_SIZE,
    TAG_SIZE,
    BlobNotFound,
    Tally,
    check_chunk_size,
    check_id,
    open_records,
    read_header,
    seal_records,
    unwrap,
)
from mailbridge.store.blobs import StoredBlob, new_blob
from mailbridge.store.models import Blob, BlobChunk

READ_BYTES = 2 * 1024 * 1024  # records fetched per query while streaming (at least one)
PAGE = 500  # blob ids per query when listing


class DatabaseBlobStore:
    """One store ("documents" or "spool") in the `blob` and `blob_chunk` tables."""

    def __init__(self, db: peewee.Database, name: str, master_key: bytes,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._db = db
        self._name = name
        self._master_key = master_key
        self._chunk_size = check_chunk_size(chunk_size)

    def put(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Encrypt and store `chunks` in one transaction (a savepoint inside the caller's):
        committed whole when this returns, or not at all."""
        blob_id, key, wrapped = new_blob(self._master_key)
        tally = Tally()
        self.put_raw(blob_id, seal_records(blob_id, key, chunks, self._chunk_size, tally))
        return StoredBlob(blob_id=blob_id, wrapped_key=wrapped, sha256=tally.sha256,
                          size=tally.size)

    def put_raw(self, blob_id: str, pieces: Iterable[bytes]) -> None:
        """The header, then each record as its own row, as they come; replaces a blob of the
        same id (a migration copying again after an interruption)."""
        check_id(blob_id)
        pieces = iter(pieces)
        with self._db.atomic():
            self._delete_rows(blob_id)
            Blob.insert(blob_id=blob_id, store=self._name, header=next(pieces),
                        created_at=time.time()).execute()
            for seq, record in enumerate(pieces):
                BlobChunk.insert(blob=blob_id, seq=seq, data=record).execute()

    def open(self, blob_id: str, wrapped_key: bytes) -> Iterator[bytes]:
        """Plaintext chunks, each authenticated before it is yielded. Key and header are
        checked now; tampered or missing records fail during iteration."""
        key = unwrap(self._master_key, wrapped_key, blob_id)
        records = self.raw(blob_id)
        header = next(records)
        return open_records(header, records, blob_id, key)

    def raw(self, blob_id: str) -> Iterator[bytes]:
        """The header, then the stored records in order, fetched a few at a time. The header
        is read now: a missing blob raises BlobNotFound here, not while streaming."""
        row = (Blob.select(Blob.header)
               .where((Blob.blob_id == check_id(blob_id)) & (Blob.store == self._name))
               .first())
        if row is None:
            raise BlobNotFound(f"blob {blob_id}: not found")
        header = bytes(row.header)
        record_size = read_header(header, blob_id) + TAG_SIZE
        return self._records(blob_id, header, max(1, READ_BYTES // record_size))

    def _records(self, blob_id: str, header: bytes, batch: int) -> Iterator[bytes]:
        yield header
        # A download streams after the request's teardown closed this thread's connection:
        # a connection opened here is closed again at the end, as the request's would be.
        opened = self._db.is_closed()
        try:
            seq = 0
            while True:
                rows = list(BlobChunk.select(BlobChunk.data)
                            .where((BlobChunk.blob == blob_id) & (BlobChunk.seq >= seq))
                            .order_by(BlobChunk.seq).limit(batch).tuples())
                for (data,) in rows:
                    yield bytes(data)
                if len(rows) < batch:
                    return
                seq += batch
        finally:
            if opened and not self._db.is_closed() and not self._db.in_transaction():
                self._db.close()

    def exists(self, blob_id: str) -> bool:
        return (Blob.select().where((Blob.blob_id == check_id(blob_id))
                                    & (Blob.store == self._name)).exists())

    def blob_ids(self) -> Iterator[str]:
        """Every blob of this store, a page of ids per query."""
        after = ""
        while True:
            page = [blob_id for (blob_id,) in
                    Blob.select(Blob.blob_id)
                    .where((Blob.store == self._name) & (Blob.blob_id > after))
                    .order_by(Blob.blob_id).limit(PAGE).tuples()]
            yield from page
            if len(page) < PAGE:
                return
            after = page[-1]

    def delete(self, blob_id: str) -> None:
        """Remove a blob; deleting one that is already gone is not an error."""
        check_id(blob_id)
        with self._db.atomic():
            if Blob.select().where((Blob.blob_id == blob_id)
                                   & (Blob.store == self._name)).exists():
                self._delete_rows(blob_id)

    def stale_files(self, older_than: float) -> Iterator[tuple[str, bool]]:
        """Blobs stored before `older_than` (a `time.time()` value), for the orphan sweep.
        A blob is written in one transaction, so there are never half-written ones."""
        after = ""
        while True:
            page = [blob_id for (blob_id,) in
                    Blob.select(Blob.blob_id)
                    .where((Blob.store == self._name) & (Blob.created_at < older_than)
                           & (Blob.blob_id > after))
                    .order_by(Blob.blob_id).limit(PAGE).tuples()]
            for blob_id in page:
                yield blob_id, False
            if len(page) < PAGE:
                return
            after = page[-1]

    def delete_temporary(self, name: str) -> None:
        """Nothing to do: this store never leaves half-written blobs."""

    def _delete_rows(self, blob_id: str) -> None:
        BlobChunk.delete().where(BlobChunk.blob == blob_id).execute()
        Blob.delete().where(Blob.blob_id == blob_id).execute()
