"""The staff console's page for documents a recipient sent back (`shares.send_back`): who sent
what, their message, and each document to view or download — every view and download audited
on the original share. Open to the original share's sender and their clinic's admins."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, Flask, Response, abort, render_template, request

from mailbridge.clock import local_text
from mailbridge.shares import console
from mailbridge.store import sealed
from mailbridge.store.models import Document, Member, SentBack, Share
from mailbridge.store.states import Audit
from mailbridge.web import access, staff_access
from mailbridge.web.documents import (
    INLINE_CSP,
    content_disposition,
    download_type,
    inline_viewable,
)
from mailbridge.web.library import human_size
from mailbridge.web.staff_access import require_member

bp = Blueprint("staff_sent_back", __name__)


@dataclass(frozen=True)
class Returned:
    """One batch of documents sent back on a share, as the console lists it."""

    id: int
    address: str
    sent_text: str
    count: int


def register(app: Flask, limiter) -> None:
    app.register_blueprint(bp)

    @app.context_processor
    def sent_back_helpers():
        return {"sent_back_for": sent_back_for}


def sent_back_for(share: Share) -> list[Returned]:
    """Documents sent back on `share`, newest first (for the console's share page)."""
    rows = (SentBack.select().where(SentBack.original == share)
            .order_by(SentBack.created_at.desc(), SentBack.id.desc()))
    return [Returned(row.id, row.address, local_text(row.created_at, share.clinic.timezone),
                     Document.select().where(Document.share == row.share_id).count())
            for row in rows]


def _sent_back(member: Member, sent_back_id: int) -> SentBack:
    row = SentBack.get_or_none(SentBack.id == sent_back_id)
    if row is None or not console.may_act(member, row.original):
        abort(404)  # another clinic's answers like a missing one
    return row


def _document(member: Member, sent_back_id: int, document_id: int) -> tuple[SentBack, Document]:
    row = _sent_back(member, sent_back_id)
    document = Document.get_or_none((Document.id == document_id)
                                    & (Document.share == row.share_id))
    if document is None or not document.blob_key:  # shredded under retention: gone
        abort(404)
    return row, document


@bp.get("/staff/returns/<int:sent_back_id>")
@require_member
def page(member: Member, sent_back_id: int):
    row = _sent_back(member, sent_back_id)
    runtime = access.runtime()
    original, held = row.original, row.share
    documents = [(d, sealed.document_name(runtime.phi_key, d), human_size(d.size))
                 for d in Document.select().where(Document.share == held)
                 .order_by(Document.position, Document.id)]
    return render_template(
        "staff/sent_back.html", member=member, row=row, original=original,
        title=sealed.share_title(runtime.phi_key, original),
        sent_text=local_text(row.created_at, original.clinic.timezone),
        note_html=sealed.share_note(runtime.phi_key, held), documents=documents,
        purged=held.purged_at is not None, inline_viewable=inline_viewable)


def _stream(document: Document, disposition: str, content_type: str) -> Response:
    runtime = access.runtime()
    chunks = runtime.documents.open(document.blob_id, bytes(document.blob_key))
    response = Response(chunks, direct_passthrough=True, content_type=content_type)
    response.headers["Content-Length"] = str(document.size)
    name = sealed.document_name(runtime.phi_key, document)
    response.headers["Content-Disposition"] = content_disposition(disposition, name)
    return response


def _record(kind: str, member: Member, row: SentBack, document: Document) -> None:
    if request.method == "GET":  # HEAD fetches no document
        staff_access.record(kind, member, share=row.original_id, document=document,
                            detail={"sent_back": row.id, "sender": row.address})


@bp.get("/staff/returns/<int:sent_back_id>/documents/<int:document_id>")
@require_member
def view(member: Member, sent_back_id: int, document_id: int):
    """Shown by the browser itself (PDF and images); other kinds only download."""
    row, document = _document(member, sent_back_id, document_id)
    if not inline_viewable(document):
        abort(404)
    response = _stream(document, "inline", document.content_type)
    response.headers["Content-Security-Policy"] = INLINE_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    _record(Audit.RETURNED_DOCUMENT_VIEWED, member, row, document)
    return response


@bp.get("/staff/returns/<int:sent_back_id>/documents/<int:document_id>/download")
@require_member
def download(member: Member, sent_back_id: int, document_id: int):
    row, document = _document(member, sent_back_id, document_id)
    response = _stream(document, "attachment", download_type(document))
    _record(Audit.RETURNED_DOCUMENT_DOWNLOADED, member, row, document)
    return response
