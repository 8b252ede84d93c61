"""Encrypted storage: small sealed values and streamed, chunk-encrypted document blobs."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from mailbridge.store.blob_format import (
    BLOB_ID,
    DEFAULT_CHUNK_SIZE,
    HEADER,
    MAX_CHUNK_SIZE,
    TAG_SIZE,
    BlobNotFound,
    StorageError,
    StorageFull,
    Tally,
    check_chunk_size,
    check_id,
    open_records,
    read_header,
    seal_records,
    unwrap,
)

__all__ = ["MAX_CHUNK_SIZE", "BlobNotFound", "BlobStore", "FallbackBlobStore",
           "LocalBlobStore", "StorageError", "StorageFull", "StoredBlob", "put_bytes",
           "read_all", "seal", "unseal"]

_SEAL_VERSION = b"\x01"


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM with a random nonce; for small values kept in the database."""
    nonce = os.urandom(12)
    return _SEAL_VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    """Inverse of `seal`; raises cryptography.exceptions.InvalidTag if tampered with."""
    if sealed[:1] != _SEAL_VERSION:
        raise ValueError("unknown sealed-value version")
    return AESGCM(key).decrypt(sealed[1:13], sealed[13:], aad)


# --- document blobs ----------------------------------------------------------------------
#
# The format (header and sealed records) is in blob_format.py; the stores here and in
# blob_db.py keep it byte for byte, so a blob moves between them without being decrypted.

_FOLDER = re.compile(r"[0-9a-f]{2}")
_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.[A-Za-z0-9_]+\.tmp")  # what `put` writes first


@dataclass(frozen=True)
class StoredBlob:
    blob_id: str  # random hex, never derived from anything the sender chose
    wrapped_key: bytes  # the blob's own AES-256 key, RFC 3394-wrapped by the master key
    sha256: str  # hex digest of the plaintext
    size: int  # plaintext bytes


class BlobStore(Protocol):
    def put(self, chunks: Iterable[bytes]) -> StoredBlob: ...

    def open(self, blob_id: str, wrapped_key: bytes) -> Iterator[bytes]: ...

    def delete(self, blob_id: str) -> None: ...

    def stale_files(self, older_than: float) -> Iterator[tuple[str, bool]]: ...

    def delete_temporary(self, name: str) -> None: ...

    # Moving blobs between stores (`mailbridge storage migrate`): the stored bytes, as they are.
    def blob_ids(self) -> Iterator[str]: ...

    def exists(self, blob_id: str) -> bool: ...

    def raw(self, blob_id: str) -> Iterator[bytes]: ...

    def put_raw(self, blob_id: str, pieces: Iterable[bytes]) -> None: ...


def new_blob(master_key: bytes) -> tuple[str, bytes, bytes]:
    """A fresh blob id, its own key, and that key wrapped by the master key."""
    key = AESGCM.generate_key(bit_length=256)
    return secrets.token_hex(16), key, aes_key_wrap(master_key, key)


class LocalBlobStore:
    """Blobs as files under `root/<first two hex digits>/<blob_id>`, written durably."""

    def __init__(self, root: Path, master_key: bytes,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._root = Path(root)
        self._master_key = master_key
        self._chunk_size = check_chunk_size(chunk_size)

    def put(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Encrypt and store `chunks`; the blob is on stable storage when this returns."""
        blob_id, key, wrapped = new_blob(self._master_key)
        tally = Tally()
        self.put_raw(blob_id, seal_records(blob_id, key, chunks, self._chunk_size, tally))
        return StoredBlob(blob_id=blob_id, wrapped_key=wrapped, sha256=tally.sha256,
                          size=tally.size)

    def put_raw(self, blob_id: str, pieces: Iterable[bytes]) -> None:
        """Write `pieces` as the file of `blob_id`, replacing it whole or not at all."""
        path = self._path(blob_id)
        with _os_errors(blob_id):
            created_dir = not path.parent.is_dir()
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created_dir:
                _fsync_dir(path.parent.parent)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{blob_id}.", suffix=".tmp", dir=path.parent)
        try:
            # Unbuffered, so closing after a failed write has nothing left to flush (and fail).
            with os.fdopen(fd, "wb", buffering=0) as out:
                for piece in pieces:
                    _write_all(out, piece, blob_id)
                with _os_errors(blob_id):
                    os.fsync(out.fileno())
            with _os_errors(blob_id):
                os.replace(tmp_name, path)
                _fsync_dir(path.parent)
        except BaseException:
            # Also on the caller's own errors (e.g. a size limit hit mid-stream).
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def open(self, blob_id: str, wrapped_key: bytes) -> Iterator[bytes]:
        """Plaintext chunks, each authenticated before it is yielded.

        Key and header are checked now, so a missing blob or wrong key fails before the
        caller starts sending anything; tampered content fails during iteration.
        """
        key = unwrap(self._master_key, wrapped_key, blob_id)
        records = self.raw(blob_id)
        header = next(records)
        return open_records(header, records, blob_id, key)

    def raw(self, blob_id: str) -> Iterator[bytes]:
        """The header, then one stored record at a time. The file is opened (and its header
        checked) now: a missing blob raises BlobNotFound here, not while streaming."""
        path = self._path(blob_id)
        with _os_errors(blob_id):
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        try:
            header = f.read(HEADER.size)
            record_size = read_header(header, blob_id) + TAG_SIZE
        except BaseException:
            f.close()
            raise
        return _file_records(f, header, record_size, blob_id)

    def exists(self, blob_id: str) -> bool:
        return self._path(blob_id).is_file()

    def blob_ids(self) -> Iterator[str]:
        """Every complete blob (never a `.tmp` file of a write in progress)."""
        if not self._root.is_dir():
            return
        for folder in sorted(self._root.iterdir()):
            if folder.is_dir() and _FOLDER.fullmatch(folder.name):
                yield from sorted(p.name for p in folder.iterdir()
                                  if BLOB_ID.fullmatch(p.name) and p.name[:2] == folder.name)

    def delete(self, blob_id: str) -> None:
        """Remove a blob; deleting one that is already gone is not an error."""
        path = self._path(blob_id)
        with _os_errors(blob_id):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            _fsync_dir(path.parent)

    def stale_files(self, older_than: float) -> Iterator[tuple[str, bool]]:
        """Files last written before `older_than` (a `time.time()` value), as (name,
        temporary): blobs by id, and `.tmp` files a crash left half-written."""
        if not self._root.is_dir():
            return
        for folder in sorted(self._root.iterdir()):
            if not (folder.is_dir() and _FOLDER.fullmatch(folder.name)):
                continue
            for path in folder.iterdir():
                try:
                    info = path.lstat()
                except FileNotFoundError:  # deleted meanwhile
                    continue
                if not stat.S_ISREG(info.st_mode) or info.st_mtime >= older_than:
                    continue
                if BLOB_ID.fullmatch(path.name) and path.name[:2] == folder.name:
                    yield path.name, False
                elif _TEMPORARY.fullmatch(path.name) and path.name[1:3] == folder.name:
                    yield path.name, True

    def delete_temporary(self, name: str) -> None:
        """Remove a half-written `.tmp` file named by `stale_files`."""
        if not _TEMPORARY.fullmatch(name):
            raise StorageError("not a temporary blob file")
        with _os_errors(name[1:33]), contextlib.suppress(FileNotFoundError):
            (self._root / name[1:3] / name).unlink()

    def _path(self, blob_id: str) -> Path:
        check_id(blob_id)
        return self._root / blob_id[:2] / blob_id


class FallbackBlobStore:
    """The configured store, reading a blob from the other one when it is not (yet) there:
    while `mailbridge storage migrate` moves blobs, every blob stays readable wherever it is.
    New blobs go to the configured store; deleting deletes from both."""

    def __init__(self, primary: BlobStore, previous: BlobStore) -> None:
        self.primary, self.previous = primary, previous

    def put(self, chunks: Iterable[bytes]) -> StoredBlob:
        return self.primary.put(chunks)

    def open(self, blob_id: str, wrapped_key: bytes) -> Iterator[bytes]:
        try:
            return self.primary.open(blob_id, wrapped_key)
        except BlobNotFound as missing:
            try:
                return self.previous.open(blob_id, wrapped_key)
            except StorageError:
                raise missing from None

    def delete(self, blob_id: str) -> None:
        self.primary.delete(blob_id)
        self.previous.delete(blob_id)

    def stale_files(self, older_than: float) -> Iterator[tuple[str, bool]]:
        yield from self.primary.stale_files(older_than)
        yield from self.previous.stale_files(older_than)

    def delete_temporary(self, name: str) -> None:
        self.primary.delete_temporary(name)
        self.previous.delete_temporary(name)

    def blob_ids(self) -> Iterator[str]:
        return self.primary.blob_ids()

    def exists(self, blob_id: str) -> bool:
        return self.primary.exists(blob_id) or self.previous.exists(blob_id)

    def raw(self, blob_id: str) -> Iterator[bytes]:
        try:
            return self.primary.raw(blob_id)
        except BlobNotFound:
            return self.previous.raw(blob_id)

    def put_raw(self, blob_id: str, pieces: Iterable[bytes]) -> None:
        self.primary.put_raw(blob_id, pieces)


def read_all(store: BlobStore, blob_id: str, wrapped_key: bytes) -> bytes:
    """The whole plaintext; only for content known to be small."""
    return b"".join(store.open(blob_id, wrapped_key))


def put_bytes(store: BlobStore, data: bytes) -> StoredBlob:
    return store.put([data])


def create_master_key_file(path: Path) -> bool:
    """Write a new random base64 master key (mode 0600) unless `path` exists; True if created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask can only narrow it, but be explicit
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        # A half-written key file would block every later attempt to create one.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    _fsync_dir(Path(path).parent)
    return True


def _write_all(out: BinaryIO, data: bytes, blob_id: str) -> None:
    view = memoryview(data)
    with _os_errors(blob_id):
        while view:  # an unbuffered write may write only part
            view = view[out.write(view):]


def _file_records(f: BinaryIO, header: bytes, record_size: int,
                  blob_id: str) -> Iterator[bytes]:
    with f:
        yield header
        while True:
            with _os_errors(blob_id):
                record = f.read(record_size)
            if not record:
                return
            yield record


def _fsync_dir(path: Path) -> None:
    # Makes a rename, create or unlink inside `path` survive power loss.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _os_errors(blob_id: str) -> Iterator[None]:
    """OSError -> StorageFull / StorageError, naming only the blob id (never a path)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"blob {blob_id}: storage full") from exc
        if isinstance(exc, FileNotFoundError):
            raise BlobNotFound(f"blob {blob_id}: not found") from exc
        raise StorageError(f"blob {blob_id}: {exc.strerror or type(exc).__name__}") from exc
