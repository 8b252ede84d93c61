"""The recipient's library: every share the signed-in account has claimed, newest first, and
the shares they moved to "Archived" (a per-recipient flag; other recipients never see it)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, Flask, flash, redirect, render_template, url_for
from flask_limiter import Limiter

from mailbridge.clock import local_text
from mailbridge.shares import clinics
from mailbridge.store import sealed
from mailbridge.store.models import Account, Clinic, Document, Grant, Member, SentBack, Share
from mailbridge.store.states import Audit, GrantState
from mailbridge.web import access
from mailbridge.web.access import current_account, require_account

bp = Blueprint("library", __name__)


@dataclass(frozen=True)
class DocumentEntry:
    id: int
    filename: str
    type_label: str  # "PDF", "DOCX", ...
    size_text: str


@dataclass(frozen=True)
class ShareEntry:
    share_id: int
    title: str
    clinic: str
    sender: str
    shared_at: str  # in the clinic's time zone
    shared_at_iso: str  # UTC, for <time datetime>
    note_html: str  # sanitised with bleach at intake
    documents: list[DocumentEntry]
    removed_note: str = ""  # why the documents are gone (the clinic's retention policy)
    can_send_back: bool = False  # "Send documents back" (not on documents sent back themselves)


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{round(size / 1024)} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def library_entries(account: Account, *, archived: bool) -> list[ShareEntry]:
    """The account's claimed shares (archived or not), newest first, with their documents."""
    runtime = access.runtime()
    archived_filter = Grant.archived_at.is_null(False) if archived else Grant.archived_at.is_null()
    rows = (Share.select(Share, Clinic, Member)
            .join(Grant, on=(Grant.share == Share.id))
            .switch(Share).join(Clinic)
            .switch(Share).join(Member)
            .where((Grant.account == account) & (Grant.state == GrantState.CLAIMED)
                   & Grant.removed_at.is_null() & archived_filter)
            .order_by(Share.created_at.desc(), Share.id.desc()))
    shares = list({share.id: share for share in rows}.values())  # one entry per share
    documents: dict[int, list[DocumentEntry]] = {share.id: [] for share in shares}
    returned = {row.share_id for row in SentBack.select(SentBack.share)
                .where(SentBack.share.in_(list(documents)))} if shares else set()
    if shares:
        query = (Document.select().where(Document.share.in_(list(documents)))
                 .order_by(Document.position, Document.id))
        for document in query:
            documents[document.share_id].append(DocumentEntry(
                id=document.id, filename=sealed.document_name(runtime.phi_key, document),
                type_label=document.kind.upper(),
                size_text=human_size(document.size)))
    return [ShareEntry(share_id=share.id, title=sealed.share_title(runtime.phi_key, share),
                       clinic=share.clinic.name,
                       sender=share.sender.name,
                       shared_at=local_text(share.created_at, share.clinic.timezone),
                       shared_at_iso=share.created_at.isoformat() + "Z",
                       note_html=sealed.share_note(runtime.phi_key, share),
                       documents=[] if share.purged_at else documents[share.id],
                       removed_note=_removed_note(share),
                       can_send_back=share.id not in returned and share.purged_at is None)
            for share in shares]


def _removed_note(share: Share) -> str:
    if share.purged_at is None:
        return ""
    name = clinics.policy(share.clinic, access.runtime().settings).display_name
    return (f"The documents were removed under {name}'s retention policy on "
            f"{local_text(share.purged_at, share.clinic.timezone)}.")


@bp.get("/library")
@require_account
def index():
    return _library_page(archived=False)


@bp.get("/library/archived")
@require_account
def archived():
    return _library_page(archived=True)


def _library_page(*, archived: bool):
    entries = library_entries(current_account(), archived=archived)
    return render_template("library.html", archived=archived, shares=entries)


@bp.post("/library/shares/<int:share_id>/archive")
@require_account
def archive(share_id: int):
    _set_archived(share_id, archived=True)
    flash("Moved to Archived. You can restore it from there at any time.")
    return redirect(url_for("library.index"))


@bp.post("/library/shares/<int:share_id>/restore")
@require_account
def restore(share_id: int):
    _set_archived(share_id, archived=False)
    flash("Moved back to your library.")
    return redirect(url_for("library.archived"))


@bp.get("/library/shares/<int:share_id>/remove")
@require_account
def remove_confirm(share_id: int):
    """Asks first: removing is for good (the sender's record and the audit trail stay)."""
    account = current_account()
    grant = access.active_grant(account, share_id)
    if grant is None:
        access.refuse(account, share_id, share=share_id)
    [entry] = [e for archived in (False, True) for e in library_entries(account, archived=archived)
               if e.share_id == share_id]
    return render_template("library_remove.html", entry=entry)


@bp.post("/library/shares/<int:share_id>/remove")
@require_account
def remove(share_id: int):
    account = current_account()
    grant = access.active_grant(account, share_id)
    if grant is None:
        access.refuse(account, share_id, share=share_id)
    runtime = access.runtime()
    with runtime.db.atomic():
        Grant.update(removed_at=access.now()).where(Grant.id == grant.id).execute()
        access.record(Audit.SHARE_REMOVED, account=account, share=grant.share_id, grant=grant)
    flash("Removed from your library for good.")
    return redirect(url_for("library.index"))


def _set_archived(share_id: int, *, archived: bool) -> None:
    account = current_account()
    grant = access.active_grant(account, share_id)
    if grant is None:
        access.refuse(account, share_id, share=share_id)
    runtime = access.runtime()
    with runtime.db.atomic():
        # Only this account's grant: other recipients of the share keep their own view.
        (Grant.update(archived_at=access.now() if archived else None)
         .where(Grant.id == grant.id).execute())
        access.record(Audit.SHARE_ARCHIVED if archived else Audit.SHARE_RESTORED, account=account,
                      share=grant.share_id, grant=grant)


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
