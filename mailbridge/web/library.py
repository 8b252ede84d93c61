"""The recipient's library: every share the signed-in account has claimed, newest first, and
the shares they moved to "Archived" (a per-recipient flag; other recipients never see it)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import NoReturn
from zoneinfo import ZoneInfo

from flask import Blueprint, Flask, abort, flash, redirect, render_template, url_for
from flask_limiter import Limiter

from mailbridge import phi
from mailbridge.models import Account, Clinic, Document, Grant, Member, Share
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


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{round(size / 1024)} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def local_time(at: dt.datetime, timezone: str) -> str:
    local = at.replace(tzinfo=dt.UTC).astimezone(ZoneInfo(timezone))
    return local.strftime("%d %b %Y, %H:%M %Z")


def library_entries(account: Account, *, archived: bool) -> list[ShareEntry]:
    """The account's claimed shares (archived or not), newest first, with their documents."""
    runtime = access.runtime()
    archived_filter = Grant.archived_at.is_null(False) if archived else Grant.archived_at.is_null()
    rows = (Share.select(Share, Clinic, Member)
            .join(Grant, on=(Grant.share == Share.id))
            .switch(Share).join(Clinic)
            .switch(Share).join(Member)
            .where((Grant.account == account) & (Grant.state == "claimed") & archived_filter)
            .order_by(Share.created_at.desc(), Share.id.desc()))
    shares = list({share.id: share for share in rows}.values())  # one entry per share
    documents: dict[int, list[DocumentEntry]] = {share.id: [] for share in shares}
    if shares:
        query = (Document.select().where(Document.share.in_(list(documents)))
                 .order_by(Document.position, Document.id))
        for document in query:
            documents[document.share_id].append(DocumentEntry(
                id=document.id, filename=phi.document_name(runtime, document),
                type_label=document.kind.upper(),
                size_text=human_size(document.size)))
    return [ShareEntry(share_id=share.id, title=phi.share_title(runtime, share),
                       clinic=share.clinic.name,
                       sender=share.sender.name,
                       shared_at=local_time(share.created_at, share.clinic.timezone),
                       shared_at_iso=share.created_at.isoformat() + "Z",
                       note_html=phi.share_note(runtime, share), documents=documents[share.id])
            for share in shares]


def denial_reason(account: Account, share_id: int) -> str:
    """Why this account may not open a share, for the audit trail only (never shown)."""
    grant = (Grant.select().where((Grant.account == account) & (Grant.share == share_id))
             .first())
    return access.grant_state(grant, access.now()) if grant is not None else "not_yours"


def refuse(account: Account, share_id: int | None, *, document: Document | None = None,
           **detail: int) -> NoReturn:
    """Audit a refused request and answer with the same 404 as for something missing."""
    exists = share_id is not None and Share.get_or_none(Share.id == share_id) is not None
    reason = denial_reason(account, share_id) if exists else "missing"
    access.record("access_denied", account=account, share=share_id if exists else None,
                  document=document, detail={"reason": reason, **detail})
    abort(404)


@bp.get("/library")
@require_account
def index():
    account = current_account()
    return render_template("library.html", archived=False,
                           shares=library_entries(account, archived=False))


@bp.get("/library/archived")
@require_account
def archived():
    account = current_account()
    return render_template("library.html", archived=True,
                           shares=library_entries(account, archived=True))


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


def _set_archived(share_id: int, *, archived: bool) -> None:
    account = current_account()
    grant = access.active_grant(account, share_id)
    if grant is None:
        refuse(account, share_id, share=share_id)
    runtime = access.runtime()
    with runtime.db.atomic():
        # Only this account's grant: other recipients of the share keep their own view.
        (Grant.update(archived_at=access.now() if archived else None)
         .where(Grant.id == grant.id).execute())
        access.record("share_archived" if archived else "share_restored", account=account,
                      share=grant.share_id, grant=grant)


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
