"""The encrypted blob format every blob store keeps, byte for byte: a header, then one
AES-256-GCM record per plaintext chunk. Sealing and opening work on streams of records, so
neither side ever holds a whole document.

Header: magic, version, chunk size, nonce prefix. Every chunk but the last holds exactly
`chunk size` bytes; the last may be shorter or empty. Each record's AAD binds header, blob id,
chunk index and a last-chunk flag, so edits, reordering, truncation, appending or moving a
blob to another id all fail authentication. The chunk size is read from each blob's header:
blobs written with an older chunk size open as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

MAGIC = b"MBLB"
VERSION = 1
HEADER = struct.Struct(">4sBI8s")  # magic, version, chunk size, nonce prefix
_RECORD = struct.Struct(">IB")  # chunk index, last-chunk flag (part of the AAD)
TAG_SIZE = 16
_MAX_CHUNKS = 2**32  # the per-chunk nonce counter is 4 bytes
MAX_CHUNK_SIZE = 64 * 1024 * 1024  # also caps what a forged header can make us allocate
# New blobs: pieces of this size go to the web server as they are decrypted. Well below
# waitress's 1 MB in-memory output buffer (a bigger write spills to a temporary file), and
# large enough that the per-record cost (a tag, a nonce, one call) is noise.
DEFAULT_CHUNK_SIZE = 128 * 1024
BLOB_ID = re.compile(r"[0-9a-f]{32}")


class StorageError(Exception):
    """A blob is unusable (missing, corrupt, tampered with) or cannot be written."""


class StorageFull(StorageError):
    """No space or quota left while writing; callers answer with a temporary failure."""


class BlobNotFound(StorageError):
    """No blob of that id in this store (another store may hold it, during a migration)."""


@dataclass
class Tally:
    """What `seal_records` saw of the plaintext, complete once its stream is exhausted."""

    sha256: str = ""
    size: int = 0


def check_chunk_size(chunk_size: int) -> int:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE}")
    return chunk_size


def check_id(blob_id: str) -> str:
    if not BLOB_ID.fullmatch(blob_id):
        raise StorageError("invalid blob id")
    return blob_id


def unwrap(master_key: bytes, wrapped_key: bytes, blob_id: str) -> bytes:
    try:
        return aes_key_unwrap(master_key, bytes(wrapped_key))
    except (InvalidUnwrap, ValueError):
        raise StorageError(f"blob {blob_id}: key does not unwrap (wrong master key?)") from None


def seal_records(blob_id: str, key: bytes, chunks: Iterable[bytes], chunk_size: int,
                 tally: Tally) -> Iterator[bytes]:
    """The header, then each sealed record as soon as its chunk is complete."""
    aesgcm = AESGCM(key)
    header = HEADER.pack(MAGIC, VERSION, chunk_size, os.urandom(8))
    digest = hashlib.sha256()
    yield header
    for index, (plain, last) in enumerate(_rechunk(chunks, chunk_size)):
        if index >= _MAX_CHUNKS:
            raise StorageError(f"blob {blob_id}: too many chunks")
        digest.update(plain)
        tally.size += len(plain)
        yield aesgcm.encrypt(_nonce(header, index), plain, _aad(header, blob_id, index, last))
    tally.sha256 = digest.hexdigest()


def read_header(header: bytes, blob_id: str) -> int:
    """The chunk size a header announces; StorageError for anything but a known header."""
    if len(header) != HEADER.size:
        raise StorageError(f"blob {blob_id}: truncated header")
    magic, version, chunk_size, _prefix = HEADER.unpack(header)
    if magic != MAGIC or version != VERSION:
        raise StorageError(f"blob {blob_id}: not a blob of a known version")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise StorageError(f"blob {blob_id}: implausible chunk size")
    return chunk_size


def open_records(header: bytes, records: Iterator[bytes], blob_id: str,
                 key: bytes) -> Iterator[bytes]:
    """Plaintext chunks of `records` (each one whole record), each authenticated before it
    is yielded. One record of lookahead: only the end tells which record claims to be last."""
    aesgcm = AESGCM(key)
    current = next(records, b"")
    index = 0
    while True:
        following = next(records, None)
        last = following is None
        try:
            plain = aesgcm.decrypt(_nonce(header, index), current,
                                   _aad(header, blob_id, index, last))
        except (InvalidTag, ValueError):
            raise StorageError(f"blob {blob_id}: chunk {index} fails authentication") from None
        yield plain
        if last:
            return
        current = following
        index += 1


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
