"""Encrypted blob store and sealed values: round trips, tamper detection, durability limits."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import stat
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from mailbridge.store.blob_format import DEFAULT_CHUNK_SIZE
from mailbridge.store.blobs import (
    LocalBlobStore,
    StorageError,
    StorageFull,
    create_master_key_file,
    put_bytes,
    read_all,
    seal,
    unseal,
)

CHUNK = 64  # small chunks make multi-chunk layouts cheap to build and to tamper with
TAG = 16  # AES-GCM tag appended to every chunk


@pytest.fixture
def master_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def store(tmp_path: Path, master_key: bytes) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs", master_key, chunk_size=CHUNK)


def blob_path(root: Path, blob_id: str) -> Path:
    return root / blob_id[:2] / blob_id


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def header_size(path: Path, full_chunks: int) -> int:
    """Header length of a blob whose plaintext is exactly `full_chunks` full chunks."""
    return path.stat().st_size - full_chunks * (CHUNK + TAG)


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
def test_round_trip_with_digest_and_size(store: LocalBlobStore, size: int) -> None:
    data = os.urandom(size)
    blob = put_bytes(store, data)
    assert read_all(store, blob.blob_id, blob.wrapped_key) == data
    assert blob.size == size
    assert blob.sha256 == hashlib.sha256(data).hexdigest()


def test_put_accepts_pieces_of_any_size(store: LocalBlobStore) -> None:
    pieces = [b"", b"a", os.urandom(CHUNK * 3 + 5), b"", os.urandom(CHUNK - 1), b"z"]
    blob = store.put(iter(pieces))
    assert read_all(store, blob.blob_id, blob.wrapped_key) == b"".join(pieces)


def test_default_chunk_size_round_trip(tmp_path: Path, master_key: bytes) -> None:
    store = LocalBlobStore(tmp_path, master_key)
    data = os.urandom(3 * 1024 * 1024 + 11)
    blob = put_bytes(store, data)
    chunks = list(store.open(blob.blob_id, blob.wrapped_key))
    assert b"".join(chunks) == data
    assert len(chunks) == 3 * 1024 * 1024 // DEFAULT_CHUNK_SIZE + 1


def test_blobs_written_with_the_old_chunk_size_still_open(tmp_path: Path,
                                                          master_key: bytes) -> None:
    """The chunk size is in each blob's header: documents stored before the default changed
    (1 MiB chunks) open with today's store."""
    data = os.urandom(2 * 1024 * 1024 + 5)
    old = put_bytes(LocalBlobStore(tmp_path, master_key, chunk_size=1024 * 1024), data)
    chunks = list(LocalBlobStore(tmp_path, master_key).open(old.blob_id, old.wrapped_key))
    assert b"".join(chunks) == data and len(chunks) == 3


def test_each_blob_gets_its_own_id_and_key(store: LocalBlobStore) -> None:
    a = put_bytes(store, b"same content")
    b = put_bytes(store, b"same content")
    assert a.blob_id != b.blob_id
    assert a.wrapped_key != b.wrapped_key
    assert a.sha256 == b.sha256


def test_stored_file_holds_no_plaintext(tmp_path: Path, store: LocalBlobStore) -> None:
    marker = b"PATIENT-MARKER-7f3a9c"
    blob = put_bytes(store, b"prefix " + marker * 20 + b" suffix")
    on_disk = blob_path(tmp_path / "blobs", blob.blob_id).read_bytes()
    assert marker not in on_disk
    assert [p.name for p in files_under(tmp_path / "blobs")] == [blob.blob_id]


def test_delete_is_idempotent_and_blob_is_gone(store: LocalBlobStore) -> None:
    blob = put_bytes(store, b"to be deleted")
    store.delete(blob.blob_id)
    store.delete(blob.blob_id)
    with pytest.raises(StorageError):
        store.open(blob.blob_id, blob.wrapped_key)


def test_missing_and_malformed_ids_are_storage_errors(store: LocalBlobStore) -> None:
    blob = put_bytes(store, b"x")
    with pytest.raises(StorageError):
        store.open(secrets.token_hex(16), blob.wrapped_key)
    for bad in ["../../etc/passwd", blob.blob_id.upper(), blob.blob_id + "0", ""]:
        with pytest.raises(StorageError):
            store.open(bad, blob.wrapped_key)
        with pytest.raises(StorageError):
            store.delete(bad)


def test_caller_error_mid_stream_leaves_no_file(tmp_path: Path, store: LocalBlobStore) -> None:
    def pieces() -> Iterator[bytes]:
        yield os.urandom(CHUNK * 3)
        raise ValueError("message too large")

    with pytest.raises(ValueError, match="too large"):
        store.put(pieces())
    assert files_under(tmp_path / "blobs") == []


# --- tampering ----------------------------------------------------------------------------


@pytest.fixture
def three_chunk_blob(tmp_path: Path, store: LocalBlobStore):
    data = os.urandom(3 * CHUNK)
    blob = put_bytes(store, data)
    return blob, blob_path(tmp_path / "blobs", blob.blob_id)


def assert_unreadable(store: LocalBlobStore, blob_id: str, wrapped_key: bytes) -> None:
    with pytest.raises(StorageError):
        read_all(store, blob_id, wrapped_key)


def test_flipped_byte_is_detected(store: LocalBlobStore, three_chunk_blob) -> None:
    blob, path = three_chunk_blob
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(raw)
    assert_unreadable(store, blob.blob_id, blob.wrapped_key)


def test_flipped_header_byte_is_detected(store: LocalBlobStore, three_chunk_blob) -> None:
    blob, path = three_chunk_blob
    original = path.read_bytes()
    for offset in range(header_size(path, 3)):
        raw = bytearray(original)
        raw[offset] ^= 0x01
        path.write_bytes(raw)
        assert_unreadable(store, blob.blob_id, blob.wrapped_key)
    path.write_bytes(original)
    assert len(read_all(store, blob.blob_id, blob.wrapped_key)) == 3 * CHUNK


def test_dropping_the_last_chunk_is_detected(store: LocalBlobStore, three_chunk_blob) -> None:
    blob, path = three_chunk_blob
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - (CHUNK + TAG))
    assert_unreadable(store, blob.blob_id, blob.wrapped_key)


def test_truncation_inside_a_chunk_is_detected(store: LocalBlobStore, three_chunk_blob) -> None:
    blob, path = three_chunk_blob
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 5)
    assert_unreadable(store, blob.blob_id, blob.wrapped_key)


def test_appended_chunk_is_detected(store: LocalBlobStore, three_chunk_blob) -> None:
    blob, path = three_chunk_blob
    raw = path.read_bytes()
    path.write_bytes(raw + raw[-(CHUNK + TAG):])
    assert_unreadable(store, blob.blob_id, blob.wrapped_key)


def test_swapped_chunks_are_detected(store: LocalBlobStore, three_chunk_blob) -> None:
    blob, path = three_chunk_blob
    raw = path.read_bytes()
    h, rec = header_size(path, 3), CHUNK + TAG
    first, second = raw[h:h + rec], raw[h + rec:h + 2 * rec]
    path.write_bytes(raw[:h] + second + first + raw[h + 2 * rec:])
    assert_unreadable(store, blob.blob_id, blob.wrapped_key)


def test_file_copied_to_another_id_is_detected(
    tmp_path: Path, store: LocalBlobStore, three_chunk_blob
) -> None:
    blob, path = three_chunk_blob
    other_id = secrets.token_hex(16)
    other = blob_path(tmp_path / "blobs", other_id)
    other.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, other)
    assert_unreadable(store, other_id, blob.wrapped_key)


def test_wrong_master_key_is_detected(tmp_path: Path, three_chunk_blob) -> None:
    blob, _ = three_chunk_blob
    other = LocalBlobStore(tmp_path / "blobs", os.urandom(32), chunk_size=CHUNK)
    assert_unreadable(other, blob.blob_id, blob.wrapped_key)


def test_tampered_wrapped_key_is_detected(store: LocalBlobStore, three_chunk_blob) -> None:
    blob, _ = three_chunk_blob
    key = bytearray(blob.wrapped_key)
    key[3] ^= 0x01
    assert_unreadable(store, blob.blob_id, bytes(key))


# --- bounded memory and disk full ---------------------------------------------------------


def test_large_blob_streams_in_bounded_memory(tmp_path: Path, master_key: bytes) -> None:
    store = LocalBlobStore(tmp_path, master_key)
    total = 64 * 1024 * 1024
    piece = os.urandom(100_003)  # deliberately not aligned with the chunk size
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
        got = hashlib.sha256()
        for chunk in store.open(blob.blob_id, blob.wrapped_key):
            got.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert blob.size == total
    assert got.hexdigest() == blob.sha256 == expected.hexdigest()
    assert peak < 8 * 1024 * 1024


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_raises_storage_full_and_leaves_nothing(tiny_fs: Path) -> None:
    store = LocalBlobStore(tiny_fs / "blobs", os.urandom(32), chunk_size=16 * 1024)
    with pytest.raises(StorageFull):
        put_bytes(store, os.urandom(1024 * 1024))
    assert files_under(tiny_fs) == []
    # The space of the failed attempt is released: a small blob still fits.
    blob = put_bytes(store, b"small")
    assert read_all(store, blob.blob_id, blob.wrapped_key) == b"small"


# --- master key file ----------------------------------------------------------------------


def test_master_key_file_created_once_with_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    assert create_master_key_file(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert len(base64.b64decode(first.strip(), validate=True)) == 32

    assert create_master_key_file(path) is False
    assert path.read_text() == first


def test_master_key_files_differ(tmp_path: Path) -> None:
    create_master_key_file(tmp_path / "a.key")
    create_master_key_file(tmp_path / "b.key")
    assert (tmp_path / "a.key").read_text() != (tmp_path / "b.key").read_text()


# --- sealed values ------------------------------------------------------------------------


def test_seal_round_trip(master_key: bytes) -> None:
    sealed = seal(master_key, b"receipt body", b"outbox:42")
    assert b"receipt body" not in sealed
    assert unseal(master_key, sealed, b"outbox:42") == b"receipt body"


def test_seal_detects_tampering_and_wrong_context(master_key: bytes) -> None:
    sealed = bytearray(seal(master_key, b"receipt body", b"outbox:42"))
    with pytest.raises(InvalidTag):
        unseal(master_key, bytes(sealed), b"outbox:43")
    with pytest.raises(InvalidTag):
        unseal(os.urandom(32), bytes(sealed), b"outbox:42")
    sealed[-1] ^= 0x01
    with pytest.raises(InvalidTag):
        unseal(master_key, bytes(sealed), b"outbox:42")
