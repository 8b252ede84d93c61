"""Encrypted storage: small sealed values and streamed, chunk-encrypted document blobs."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

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
# File layout: header (magic, version, chunk size, nonce prefix), then one AES-256-GCM
# record per plaintext chunk. Every chunk but the last holds exactly `chunk size` bytes;
# the last may be shorter or empty. Each record's AAD binds header, blob id, chunk index and
# a last-chunk flag, so edits, reordering, truncation, appending or renaming all fail
# authentication.

_MAGIC = b"MBLB"
_BLOB_VERSION = 1
_HEADER = struct.Struct(">4sBI8s")  # magic, version, chunk size, nonce prefix
_RECORD = struct.Struct(">IB")  # chunk index, last-chunk flag (part of the AAD)
_TAG_SIZE = 16
_MAX_CHUNKS = 2**32  # the per-chunk nonce counter is 4 bytes
MAX_CHUNK_SIZE = 64 * 1024 * 1024  # also caps what a forged header can make us allocate
_BLOB_ID = re.compile(r"[0-9a-f]{32}")
_FOLDER = re.compile(r"[0-9a-f]{2}")
_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.[A-Za-z0-9_]+\.tmp")  # what `put` writes first


@dataclass(frozen=True)
class StoredBlob:
    blob_id: str  # random hex, never derived from anything the sender chose
    wrapped_key: bytes  # the blob's own AES-256 key, RFC 3394-wrapped by the master key
    sha256: str  # hex digest of the plaintext
    size: int  # plaintext bytes


class StorageError(Exception):
    """A blob is unusable (missing, corrupt, tampered with) or cannot be written."""


class StorageFull(StorageError):
    """No space or quota left while writing; callers answer with a temporary failure."""


class BlobStore(Protocol):
    def put(self, chunks: Iterable[bytes]) -> StoredBlob: ...

    def open(self, blob_id: str, wrapped_key: bytes) -> Iterator[bytes]: ...

    def delete(self, blob_id: str) -> None: ...

    def stale_files(self, older_than: float) -> Iterator[tuple[str, bool]]: ...

    def delete_temporary(self, name: str) -> None: ...


class LocalBlobStore:
    """Blobs as files under `root/<first two hex digits>/<blob_id>`, written durably."""

    def __init__(self, root: Path, master_key: bytes, chunk_size: int = 1024 * 1024) -> None:
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes")
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE}")
        self._root = Path(root)
        self._master_key = master_key
        self._chunk_size = chunk_size

    def put(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Encrypt and store `chunks`; the blob is on stable storage when this returns."""
        blob_id = secrets.token_hex(16)
        key = AESGCM.generate_key(bit_length=256)
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
                sha256, size = _write_blob(out, blob_id, key, chunks, self._chunk_size)
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
        wrapped = aes_key_wrap(self._master_key, key)
        return StoredBlob(blob_id=blob_id, wrapped_key=wrapped, sha256=sha256, size=size)

    def open(self, blob_id: str, wrapped_key: bytes) -> Iterator[bytes]:
        """Plaintext chunks, each authenticated before it is yielded.

        Key and header are checked now, so a missing blob or wrong key fails before the
        caller starts sending anything; tampered content fails during iteration.
        """
        path = self._path(blob_id)
        try:
            key = aes_key_unwrap(self._master_key, wrapped_key)
        except (InvalidUnwrap, ValueError):
            raise StorageError(f"blob {blob_id}: key does not unwrap (wrong master key?)") from None
        with _os_errors(blob_id), open(path, "rb") as f:
            _read_header(f, blob_id)
        return _read_blob(path, blob_id, key)

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
                if _BLOB_ID.fullmatch(path.name) and path.name[:2] == folder.name:
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
        if not _BLOB_ID.fullmatch(blob_id):
            raise StorageError("invalid blob id")
        return self._root / blob_id[:2] / blob_id


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


def _write_blob(
    out: BinaryIO, blob_id: str, key: bytes, chunks: Iterable[bytes], chunk_size: int
) -> tuple[str, int]:
    aesgcm = AESGCM(key)
    header = _HEADER.pack(_MAGIC, _BLOB_VERSION, chunk_size, os.urandom(8))
    digest = hashlib.sha256()
    size = 0
    _write_all(out, header, blob_id)
    for index, (plain, last) in enumerate(_rechunk(chunks, chunk_size)):
        if index >= _MAX_CHUNKS:
            raise StorageError(f"blob {blob_id}: too many chunks")
        digest.update(plain)
        size += len(plain)
        sealed = aesgcm.encrypt(_nonce(header, index), plain, _aad(header, blob_id, index, last))
        _write_all(out, sealed, blob_id)
    return digest.hexdigest(), size


def _write_all(out: BinaryIO, data: bytes, blob_id: str) -> None:
    view = memoryview(data)
    with _os_errors(blob_id):
        while view:  # an unbuffered write may write only part
            view = view[out.write(view):]


def _read_blob(path: Path, blob_id: str, key: bytes) -> Iterator[bytes]:
    aesgcm = AESGCM(key)
    with _os_errors(blob_id), open(path, "rb") as f:
        header, chunk_size = _read_header(f, blob_id)
        record_size = chunk_size + _TAG_SIZE
        current = f.read(record_size)
        index = 0
        while True:
            # One record of lookahead: only end-of-file tells which record claims to be last.
            following = f.read(record_size)
            last = not following
            try:
                plain = aesgcm.decrypt(
                    _nonce(header, index), current, _aad(header, blob_id, index, last)
                )
            except (InvalidTag, ValueError):
                raise StorageError(f"blob {blob_id}: chunk {index} fails authentication") from None
            yield plain
            if last:
                return
            current = following
            index += 1


def _read_header(f: BinaryIO, blob_id: str) -> tuple[bytes, int]:
    header = f.read(_HEADER.size)
    if len(header) != _HEADER.size:
        raise StorageError(f"blob {blob_id}: truncated header")
    magic, version, chunk_size, _prefix = _HEADER.unpack(header)
    if magic != _MAGIC or version != _BLOB_VERSION:
        raise StorageError(f"blob {blob_id}: not a blob file of a known version")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise StorageError(f"blob {blob_id}: implausible chunk size")
    return header, chunk_size


def _rechunk(pieces: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """Re-cut arbitrary pieces into `size`-byte chunks, flagging the last one.

    A full chunk is only released once more data is known to follow, so content that is an
    exact multiple of `size` ends in a full chunk flagged last (and empty content in one
    empty last chunk).
    """
    buf = bytearray()
    for piece in pieces:
        view = memoryview(piece)
        while len(buf) + len(view) > size:
            take = size - len(buf)
            buf += view[:take]
            view = view[take:]
            yield bytes(buf), False
            buf.clear()
        buf += view
    yield bytes(buf), True


def _nonce(header: bytes, index: int) -> bytes:
    prefix = header[-8:]
    return prefix + index.to_bytes(4, "big")


def _aad(header: bytes, blob_id: str, index: int, last: bool) -> bytes:
    # All parts have fixed lengths (ids are always 32 hex digits), so the concatenation is
    # unambiguous.
    return header + blob_id.encode("ascii") + _RECORD.pack(index, last)


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
            raise StorageError(f"blob {blob_id}: not found") from exc
        raise StorageError(f"blob {blob_id}: {exc.strerror or type(exc).__name__}") from exc
