"""Moving blobs between backends (`mailbridge storage migrate`). A blob is copied as stored
(still encrypted; its key and id do not change, so no row changes), read back from the target
and compared, and only then deleted from the source. Every step can be interrupted: a copy
not committed leaves nothing (or a `.tmp` file the orphan sweep removes), a copy committed but
not yet compared is compared on the next run. Running it again resumes; running it twice does
nothing the second time."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from mailbridge.store.blob_format import BlobNotFound, StorageError
from mailbridge.store.blobs import BlobStore

log = logging.getLogger(__name__)

MOVED, ALREADY, GONE = "moved", "already there", "gone"


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: {MOVED: 0, ALREADY: 0, GONE: 0})

    def add(self, outcome: str) -> None:
        self.counts[outcome] += 1


def move(source: BlobStore, target: BlobStore, blob_id: str) -> str:
    """Move one blob; returns MOVED, ALREADY (a copy from an interrupted run was complete) or
    GONE (deleted meanwhile, e.g. by the purge: nothing is left of it in either store)."""
    try:
        if target.exists(blob_id) and _digest(target.raw(blob_id)) == _digest(
                source.raw(blob_id)):
            source.delete(blob_id)
            return ALREADY
        copied = hashlib.sha256()
        target.put_raw(blob_id, _tee(source.raw(blob_id), copied))
    except BlobNotFound:
        return GONE
    if _digest(target.raw(blob_id)) != copied.hexdigest():
        raise StorageError(f"blob {blob_id}: the copy reads back differently; the source is "
                           "kept")
    if not source.exists(blob_id):
        # Deleted (shredded, purged) while we copied: the copy must not outlive it.
        target.delete(blob_id)
        return GONE
    source.delete(blob_id)
    return MOVED


def move_all(pairs: Iterable[tuple[str, BlobStore, BlobStore, list[str]]],
             step: Callable[[int], None]) -> dict[str, Tally]:
    """Move every listed blob of each (name, source, target, ids); `step(1)` after each."""
    done: dict[str, Tally] = {}
    for name, source, target, ids in pairs:
        tally = done.setdefault(name, Tally())
        for blob_id in ids:
            tally.add(move(source, target, blob_id))
            step(1)
        log.info("storage: %s: %d blob(s) moved, %d already there, %d deleted meanwhile",
                 name, tally.counts[MOVED], tally.counts[ALREADY], tally.counts[GONE])
    return done


def _tee(pieces: Iterator[bytes], digest) -> Iterator[bytes]:
    for piece in pieces:
        digest.update(piece)
        yield piece


def _digest(pieces: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()
