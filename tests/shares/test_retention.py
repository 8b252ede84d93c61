"""Retention as a clinic sets it: documents past the clinic's `document_retention_days` are
crypto-shredded by the purge job (files gone, keys wiped) while the share, its recipients and
its audit trail stay; a legal hold on the share or the clinic stops it; audit events past
`[retention] audit_retention_days` go behind a checkpoint the chain still verifies from."""

from __future__ import annotations

import dataclasses
import html

from mailbridge.shares import clinics, purge, retention
from mailbridge.store import audit, blobs, sealed
from mailbridge.store.blobs import StorageError
from mailbridge.store.models import AuditCheckpoint, AuditEvent, Document, Grant, Share
from mailbridge.store.states import Audit
from tests.portal_helpers import claim, make_account, make_app, signed_in_client
from tests.shares.test_notify import FILENAME, SMITH, TITLE, configured, shared


def kept_for(rt, days: float, **policy) -> Share:
    share = shared(rt)
    clinics.change(share.clinic, clinics.Changes(document_retention_days=days, **policy))
    return share


def blob_ids(share: Share) -> list[str]:
    return [d.blob_id for d in Document.select().where(Document.share == share)]


def test_documents_past_retention_are_shredded_and_the_record_stays(runtime):
    rt = configured(runtime)
    share = kept_for(rt, 30)
    files = blob_ids(share)
    rt.clock.advance(days=29)
    purge.purge(rt)
    assert Share.get_by_id(share.id).purged_at is None
    rt.clock.advance(days=2)
    purge.purge(rt)

    share = Share.get_by_id(share.id)
    assert share.purged_at == rt.clock()
    for blob_id, document in zip(files, Document.select().where(Document.share == share),
                                 strict=True):
        assert document.blob_key == b""
        try:
            blobs.read_all(rt.documents, blob_id, b"\0" * 60)
        except StorageError:
            pass
        else:
            raise AssertionError("a shredded document's file is still there")
        assert sealed.document_name(rt.phi_key, document) == FILENAME  # the record stays
    assert sealed.share_title(rt.phi_key, share) == TITLE
    assert sealed.share_note(rt.phi_key, share) == ""
    assert Grant.select().where(Grant.share == share).count() == 1
    [event] = AuditEvent.select().where(AuditEvent.kind == Audit.SHARE_PURGED)
    assert event.share_id == share.id and event.actor == "retention"
    assert event.detail == {"documents": 1, "retention_days": 30}
    assert audit.verify(rt.audit_key).ok
    purge.purge(rt)  # once only
    assert AuditEvent.select().where(AuditEvent.kind == Audit.SHARE_PURGED).count() == 1


def test_the_recipients_library_says_why_the_documents_are_gone(runtime):
    rt = configured(runtime)
    share = kept_for(rt, 30, display_name="Riverside Physical Therapy")
    account = make_account(rt, SMITH)
    claim(rt, share, SMITH, account)
    document = Document.get(Document.share == share)
    client = signed_in_client(make_app(rt), rt, account)
    assert client.get(f"/documents/{document.id}/download").status_code == 200
    rt.clock.advance(days=31)
    purge.purge(rt)
    client = signed_in_client(make_app(rt), rt, account)  # a month later, signed in again
    page = html.unescape(client.get("/library").get_data(as_text=True))
    assert TITLE in page
    assert ("The documents were removed under Riverside Physical Therapy's retention policy "
            "on Tue 29 Dec 2026, 07:00 EST.") in page
    assert FILENAME not in page
    assert client.get(f"/documents/{document.id}/download").status_code == 404


def test_a_legal_hold_on_the_share_or_the_clinic_keeps_the_documents(runtime):
    rt = configured(runtime)
    held = kept_for(rt, 30)
    assert retention.hold(rt, held, on=True, actor="operator")
    assert not retention.hold(rt, held, on=True, actor="operator")  # already
    rt.clock.advance(days=31)
    purge.purge(rt)
    assert Share.get_by_id(held.id).purged_at is None
    assert Document.get(Document.share == held).blob_key != b""

    clinics.change(held.clinic, clinics.Changes(legal_hold=True))
    assert retention.hold(rt, held, on=False, actor="operator")
    purge.purge(rt)
    assert Share.get_by_id(held.id).purged_at is None  # the clinic's hold still holds

    clinics.change(held.clinic, clinics.Changes(legal_hold=False))
    purge.purge(rt)
    assert Share.get_by_id(held.id).purged_at is not None
    kinds = [e.kind for e in AuditEvent.select().where(AuditEvent.share == held)
             .order_by(AuditEvent.seq)]
    assert kinds[-3:] == [Audit.LEGAL_HOLD_SET, Audit.LEGAL_HOLD_RELEASED, Audit.SHARE_PURGED]


def test_without_a_retention_policy_documents_are_kept(runtime):
    rt = configured(runtime)
    share = shared(rt)
    rt.clock.advance(days=3650)
    purge.purge(rt)
    assert Share.get_by_id(share.id).purged_at is None
    assert Document.get(Document.share == share).blob_key != b""


def test_a_file_that_cannot_be_deleted_now_is_retried_and_nothing_is_marked(runtime):
    rt = configured(runtime)
    share = kept_for(rt, 1)
    rt.clock.advance(days=2)

    class Stuck:
        def __getattr__(self, name):
            return getattr(rt.documents, name)

        def delete(self, blob_id):
            raise StorageError("device busy")

    stuck = dataclasses.replace(rt, documents=Stuck())
    assert retention.shred_expired(stuck) == 0
    assert Share.get_by_id(share.id).purged_at is None
    assert Document.get(Document.share == share).blob_key != b""
    assert retention.shred_expired(rt) == 1


def test_audit_events_past_audit_retention_days_go_behind_a_checkpoint(runtime):
    rt = configured(runtime, retention={"audit_retention_days": 365})
    shared(rt)
    first = AuditEvent.select().count()
    rt.clock.advance(days=300)
    second = rt.clock()
    shared(rt, subject="Another")
    purge.purge(rt)
    assert AuditCheckpoint.select().count() == 0  # nothing is a year old yet
    rt.clock.advance(days=100)  # the first share's events are now 400 days old
    purge.purge(rt)
    [checkpoint] = AuditCheckpoint.select()
    assert checkpoint.pruned == first
    assert AuditEvent.select().where(AuditEvent.at < second).count() == 0
    verdict = audit.verify(rt.audit_key)
    assert verdict.ok and verdict.checked == AuditEvent.select().count() > 0
