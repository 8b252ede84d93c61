"""Backups of a data directory and putting one back. A backup is a folder: the SQLite
database as one consistent snapshot (taken while the service runs; with `[storage] backend =
"database"` the encrypted blobs are inside it), the encrypted blob files, and a manifest with
every file's size and SHA-256. Never the master key: the blobs and sealed columns are useless
without it, which is what makes a backup safe to keep elsewhere — and why the key must be
kept safe separately."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

FORMAT = "mailbridge-backup 1"
MANIFEST = "manifest.json"
DATABASE = "mailbridge.db"
BLOB_FOLDERS = ("documents", "spool")
CHUNK = 1024 * 1024

Progress = Callable[[int], None]  # bytes just copied


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """What a backup reads: the SQLite file (None on PostgreSQL) and the blob folders."""

    sqlite_path: Path | None
    blob_roots: dict[str, Path]  # "documents" / "spool" -> folder


@dataclass(frozen=True)
class Summary:
    files: int
    bytes: int
    missing: tuple[str, ...] = ()  # blobs the snapshot names that were deleted meanwhile


def _nothing(_: int) -> None:
    pass


# --- writing a backup -----------------------------------------------------------------------


def prepare_destination(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} is not an empty folder")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(dest, 0o700)


def snapshot_database(sqlite_path: Path, dest: Path) -> Path:
    """A consistent copy of a live SQLite database: one read transaction (WAL keeps writers
    going meanwhile) through SQLite's online backup API."""
    target = dest / DATABASE
    source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)  # pages=-1: all in one step, so no restart when writers commit
    finally:
        copy.close()
        source.close()
    os.chmod(target, 0o600)
    return target


def referenced_blobs(database: Path) -> dict[str, set[str]]:
    """The blob ids a database snapshot needs from the folders (a shredded document needs
    none; a blob kept in the database, `[storage] backend = "database"`, is in the snapshot)."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        documents = {row[0] for row in db.execute(
            "SELECT blob_id FROM document WHERE length(blob_key) > 0")}
        spool = {row[0] for row in db.execute(
            "SELECT blob_id FROM inbound_message WHERE purged_at IS NULL")}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        inside = ({row[0] for row in db.execute("SELECT blob_id FROM blob")}
                  if "blob" in tables else set())
    finally:
        db.close()
    return {"documents": documents - inside, "spool": spool - inside}


def blob_files(root: Path) -> Iterator[Path]:
    """Complete blob files (never the `.tmp` files of a write in progress)."""
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if folder.is_dir():
            yield from sorted(p for p in folder.iterdir()
                              if p.is_file() and not p.name.startswith("."))


def total_bytes(source: Source) -> int:
    size = source.sqlite_path.stat().st_size if source.sqlite_path else 0
    return size + sum(p.stat().st_size for root in source.blob_roots.values()
                      for p in blob_files(root))


def write_backup(source: Source, dest: Path, *, schema_version: int, key_fingerprint: str,
                 version: str, now: dt.datetime, progress: Progress = _nothing) -> Summary:
    """Snapshot the database, then copy the blobs: a blob the snapshot names was complete
    before the snapshot began, so it is there to copy unless the purge deleted it since
    (listed in `missing`). Blobs newer than the snapshot come along and are harmless."""
    prepare_destination(dest)
    entries: list[dict] = []
    needed: dict[str, set[str]] = {}
    if source.sqlite_path is not None:
        database = snapshot_database(source.sqlite_path, dest)
        entries.append(_entry(dest, database))
        progress(database.stat().st_size)
        needed = referenced_blobs(database)
    for folder, root in source.blob_roots.items():
        for path in blob_files(root):
            target = dest / folder / path.parent.name / path.name
            try:
                entries.append(_copy(path, target, dest, progress))
            except FileNotFoundError:  # deleted by the purge while we were copying
                continue
            needed.get(folder, set()).discard(path.name)
    missing = tuple(sorted(f"{folder}/{b}" for folder, ids in needed.items() for b in ids))
    manifest = {
        "format": FORMAT, "mailbridge": version, "created_at": now.isoformat() + "Z",
        "database": "sqlite" if source.sqlite_path else "postgresql",
        "schema_version": schema_version, "key_fingerprint": key_fingerprint,
        "missing": list(missing), "files": entries,
    }
    path = dest / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    os.chmod(path, 0o600)
    _fsync_tree(dest)
    return Summary(files=len(entries), bytes=sum(e["bytes"] for e in entries), missing=missing)


def _copy(path: Path, target: Path, dest: Path, progress: Progress) -> dict:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as src, open(target, "xb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            progress(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    os.chmod(target, 0o600)
    return {"path": target.relative_to(dest).as_posix(), "bytes": size,
            "sha256": digest.hexdigest()}


def _entry(dest: Path, path: Path) -> dict:
    return {"path": path.relative_to(dest).as_posix(), "bytes": path.stat().st_size,
            "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for folder, _, _ in os.walk(root):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- reading one back -----------------------------------------------------------------------


def read_manifest(src: Path) -> dict:
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{src} is not a mailbridge backup (no readable {MANIFEST}: "
                          f"{exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{src}: unknown backup format {manifest.get('format')!r}")
    return manifest


def check_files(src: Path, manifest: dict, progress: Progress = _nothing) -> None:
    """Every file is there, with its size and checksum: a damaged backup is refused whole."""
    for entry in manifest["files"]:
        path = src / entry["path"]
        if ".." in Path(entry["path"]).parts or not path.is_file():
            raise BackupError(f"{src}: {entry['path']} is missing")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise BackupError(f"{src}: {entry['path']} is damaged (checksum differs)")
        progress(entry["bytes"])


def check_target(sqlite_path: Path | None, blob_roots: dict[str, Path]) -> None:
    """Restoring never overwrites: the database file and blob folders must not exist yet
    (an empty folder is fine)."""
    if sqlite_path is not None and sqlite_path.exists():
        raise BackupError(f"{sqlite_path} already exists: restore into an empty data "
                          "directory ([service] data_dir)")
    for root in blob_roots.values():
        if root.exists() and any(root.iterdir()):
            raise BackupError(f"{root} is not empty: restore into an empty data directory "
                              "([service] data_dir)")


def restore_files(src: Path, manifest: dict, sqlite_path: Path | None,
                  blob_roots: dict[str, Path], progress: Progress = _nothing) -> int:
    """Copy the checked files into place; the database last, under a temporary name until
    complete, so an interrupted restore never looks like a finished one."""
    restored = 0
    database_entry = None
    for entry in manifest["files"]:
        parts = Path(entry["path"]).parts
        if parts == (DATABASE,):
            database_entry = entry
            continue
        if len(parts) != 3 or parts[0] not in blob_roots:
            raise BackupError(f"{src}: unexpected file {entry['path']}")
        target = blob_roots[parts[0]] / parts[1] / parts[2]
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(src / entry["path"], target)
        os.chmod(target, 0o600)
        progress(entry["bytes"])
        restored += 1
    if database_entry is not None:
        if sqlite_path is None:
            raise BackupError("this backup holds an SQLite database but [database] url names "
                              "PostgreSQL; restore it with an SQLite url")
        sqlite_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = sqlite_path.with_name(sqlite_path.name + ".restoring")
        shutil.copyfile(src / DATABASE, partial)
        os.chmod(partial, 0o600)
        os.replace(partial, sqlite_path)
        progress(database_entry["bytes"])
        restored += 1
    for root in [sqlite_path.parent if sqlite_path else None, *blob_roots.values()]:
        if root is not None and root.is_dir():
            _fsync_tree(root)
    return restored
