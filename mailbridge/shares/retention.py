"""Keeping records only as long as policy says. A share older than its clinic's
`document_retention_days` has its documents crypto-shredded (blobs deleted, their wrapped keys
wiped, so no copy left on disk opens again) unless a legal hold on the share or its clinic
stops it; the share, its grants and its audit trail stay. Audit events older than
`[retention] audit_retention_days` are pruned behind a signed checkpoint."""

from __future__ import annotations

import datetime as dt
import logging

from mailbridge.runtime import Runtime
from mailbridge.shares import clinics
from mailbridge.shares.jobs import Stop, stopped
from mailbridge.store import audit, audit_rows
from mailbridge.store.blobs import StorageError
from mailbridge.store.models import Clinic, Document, Share
from mailbridge.store.states import Audit

log = logging.getLogger(__name__)


BATCH = 200  # shares per transaction


def shred_expired(runtime: Runtime, stop: Stop = None, batch: int = BATCH) -> int:
    """Crypto-shred the documents of shares past their clinic's retention; returns how many
    shares were purged."""
    purged = 0
    for clinic in Clinic.select().where(Clinic.legal_hold == False):  # noqa: E712
        days = clinics.policy(clinic, runtime.settings).document_retention_days
        if not days:
            continue
        cutoff = runtime.clock() - dt.timedelta(days=days)
        due = [share.id for share in
               Share.select(Share.id).where((Share.clinic == clinic)
                                            & (Share.created_at < cutoff)
                                            & Share.purged_at.is_null()
                                            & (Share.legal_hold == False))  # noqa: E712
               .order_by(Share.id)]
        for start in range(0, len(due), batch):
            if stopped(stop):
                return purged
            purged += shred_many(runtime, due[start:start + batch], days)
    if purged:
        log.info("retention: %d share(s) past their clinic's retention purged", purged)
    return purged


def shred(runtime: Runtime, share_id: int, days: float) -> int:
    """1 if the share's documents were shredded now, 0 if something else did it first."""
    return shred_many(runtime, [share_id], days)


def shred_many(runtime: Runtime, share_ids: list[int], days: float) -> int:
    """Shred the shares' documents; returns how many shares were marked now (not those
    something else did first). The blobs go first: a crash after that leaves a share to be
    marked on the next run; a share whose blob cannot be deleted now waits for it. The marks,
    the wiped keys and notes and the audit events are one transaction of bulk statements."""
    documents: dict[int, list[Document]] = {share_id: [] for share_id in share_ids}
    for document in Document.select().where(Document.share.in_(share_ids)):
        documents[document.share_id].append(document)
    ready = [share_id for share_id in share_ids if _delete_blobs(runtime, documents[share_id])]
    if not ready:
        return 0
    now = runtime.clock()
    with runtime.db.atomic():
        marked = sorted(share_id for (share_id,) in runtime.db.execute(
            Share.update(purged_at=now).where(Share.id.in_(ready) & Share.purged_at.is_null())
            .returning(Share.id)).fetchall())
        if not marked:
            return 0
        Document.update(blob_key=b"").where(Document.share.in_(marked)).execute()
        # The title and file names stay: an accounting of disclosures must describe what was
        # shared for six years (HIPAA 164.528). The sender's free-text note goes.
        Share.update(note_sealed=b"").where(Share.id.in_(marked)).execute()
        audit.record_each(runtime.audit_key, audit_rows.Template(
            kind=Audit.SHARE_PURGED, at=now, actor="retention", varying=("share",),
            per_event_detail=True),
            [(share_id, {"documents": len(documents[share_id]), "retention_days": days})
             for share_id in marked])
    return len(marked)


def _delete_blobs(runtime: Runtime, documents: list[Document]) -> bool:
    for document in documents:
        try:
            runtime.documents.delete(document.blob_id)
        except StorageError:
            log.warning("retention: document #%d could not be deleted now; next run",
                        document.id)
            return False
    return True


def prune_audit(runtime: Runtime) -> int:
    days = runtime.settings.retention.audit_retention_days
    if not days:
        return 0
    now = runtime.clock()
    pruned = audit.prune(runtime.audit_key, now - dt.timedelta(days=days), now)
    if pruned:
        log.info("retention: %d audit event(s) older than %g days pruned behind a checkpoint",
                 pruned, days)
    return pruned


def hold(runtime: Runtime, share: Share, *, on: bool, actor: str) -> bool:
    """Set or release a share's legal hold; True if it changed."""
    now = runtime.clock()
    with runtime.db.atomic():
        changed = (Share.update(legal_hold=on)
                   .where((Share.id == share.id) & (Share.legal_hold != on)).execute())
        if changed:
            audit.record(runtime.audit_key,
                         Audit.LEGAL_HOLD_SET if on else Audit.LEGAL_HOLD_RELEASED, now,
                         actor=actor, share=share)
    return bool(changed)
