"""Opening a document: the viewer page, the bytes shown inside it, and the download. Every
request checks the account's grant again, so a revocation stops the very next request."""

from __future__ import annotations

import datetime as dt
import re
import threading
import unicodedata
from urllib.parse import quote
from zoneinfo import ZoneInfo

from flask import Blueprint, Flask, Response, abort, current_app, render_template, request
from flask_limiter import Limiter

from mailbridge.mail.filetypes import KIND_CONTENT_TYPES
from mailbridge.shares import clinics, notify
from mailbridge.store import sealed
from mailbridge.store.models import Document, Grant
from mailbridge.store.states import Audit
from mailbridge.web import access, watermark
from mailbridge.web.access import current_account, require_account

bp = Blueprint("documents", __name__)

# Kinds every browser shows by itself; the rest can only be downloaded.
INLINE_KINDS = ("pdf", "png", "jpeg", "gif")
IMAGE_KINDS = ("png", "jpeg", "gif")

# For the framed document only. `frame-ancestors 'self'` (and X-Frame-Options SAMEORIGIN for
# older browsers) lets our viewer page frame it and nobody else; `default-src 'none'` gives
# anything inside it no network access. The img/style/object sources are what browsers' own
# image and PDF viewer pages use. No `sandbox`: Chromium renders the PDF either way, but
# built-in PDF viewers have refused sandboxed documents before, and the fixed content type
# with nosniff already keeps the bytes from ever running as a page of ours.
INLINE_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
              "object-src 'self'; frame-ancestors 'self'")

# A stamped copy is built in memory (a few times the document's size); at most this many at
# once per portal process, so a burst of large downloads waits instead of exhausting memory.
STAMPING_AT_ONCE = 2

# Intake decides every stored type from the content (filenames.KIND_CONTENT_TYPES); anything
# else in the database is served as opaque bytes so a browser can never render it as ours.
SAFE_DOWNLOAD_TYPES = frozenset(KIND_CONTENT_TYPES.values())
_UNSAFE_FALLBACK_CHARS = re.compile(r'[^\x20-\x7e]|["\\%;]')


def content_disposition(disposition: str, filename: str) -> str:
    """RFC 6266: an ASCII `filename` for old clients and the exact name as RFC 5987 `filename*`."""
    ascii_name = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
    fallback = _UNSAFE_FALLBACK_CHARS.sub("_", ascii_name).strip() or "document"
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def inline_viewable(document: Document) -> bool:
    return (document.kind in INLINE_KINDS
            and document.content_type == KIND_CONTENT_TYPES[document.kind])


def download_type(document: Document) -> str:
    if document.content_type in SAFE_DOWNLOAD_TYPES:
        return document.content_type
    return "application/octet-stream"


def _open_document(document_id: int) -> tuple[Document, Grant]:
    account = current_account()
    found = access.accessible_document(account, document_id)
    if found is None:
        document = Document.get_or_none(Document.id == document_id)
        access.refuse(account, document.share_id if document else None, document=document,
               document_id=document_id)
    return found


def watermark_on(document: Document) -> bool:
    return clinics.policy(document.share.clinic, access.runtime().settings).watermark


def _stamped(document: Document, grant: Grant) -> bytes | None:
    """The copy with this recipient's watermark, when the clinic wants one and the type can
    carry it; None: the original is served."""
    if not (watermark_on(document) and watermark.stampable(document.kind)):
        return None
    timezone = clinics.policy(document.share.clinic, access.runtime().settings).timezone
    today = (access.now().replace(tzinfo=dt.UTC).astimezone(ZoneInfo(timezone))
             .strftime("%d %b %Y"))
    with current_app.extensions["mailbridge_stamping"]:
        data = b"".join(access.runtime().documents.open(document.blob_id,
                                                        bytes(document.blob_key)))
        return watermark.stamp(document.kind, data,
                               watermark.line(grant.address, today, document.share_id))


def _chunks(data: bytes, size: int = 256 * 1024):
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start:start + size])


def _stream(document: Document, disposition: str, content_type: str,
            stamped: bytes | None = None) -> Response:
    if stamped is not None:
        # A stamped copy exists only in memory, for this response; the stored file is untouched.
        response = Response(_chunks(stamped), direct_passthrough=True, content_type=content_type)
        response.headers["Content-Length"] = str(len(stamped))
    else:
        # Chunks are decrypted one by one as the client reads them; never held whole.
        chunks = access.runtime().documents.open(document.blob_id, bytes(document.blob_key))
        response = Response(chunks, direct_passthrough=True, content_type=content_type)
        response.headers["Content-Length"] = str(document.size)
    name = sealed.document_name(access.runtime().phi_key, document)
    response.headers["Content-Disposition"] = content_disposition(disposition, name)
    return response


@bp.get("/documents/<int:document_id>")
@require_account
def view(document_id: int):
    document, _grant = _open_document(document_id)
    share = document.share
    return render_template("viewer.html", document=document, share=share,
                           filename=sealed.document_name(access.runtime().phi_key, document),
                           inline=inline_viewable(document),
                           image=document.kind in IMAGE_KINDS,
                           watermark=watermark_on(document),
                           stampable=watermark.stampable(document.kind))


@bp.get("/documents/<int:document_id>/inline")
@require_account
def inline(document_id: int):
    document, grant = _open_document(document_id)
    if not inline_viewable(document):
        abort(404)
    stamped = _stamped(document, grant)
    response = _stream(document, "inline", document.content_type, stamped)
    response.headers["Content-Security-Policy"] = INLINE_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    if request.method == "GET":
        access.record(Audit.DOCUMENT_VIEWED, account=current_account(), document=document,
                      share=document.share_id, grant=grant, detail=_detail(document, stamped))
        notify.first_view(access.runtime(), grant)
    return response


@bp.get("/documents/<int:document_id>/download")
@require_account
def download(document_id: int):
    document, grant = _open_document(document_id)
    stamped = _stamped(document, grant)
    response = _stream(document, "attachment", download_type(document), stamped)
    if request.method == "GET":
        access.record(Audit.DOCUMENT_DOWNLOADED, account=current_account(), document=document,
                      share=document.share_id, grant=grant, detail=_detail(document, stamped))
        notify.first_view(access.runtime(), grant)
    return response


def _detail(document: Document, stamped: bytes | None) -> dict | None:
    """With watermarks on, the audit trail says whether this copy carried one."""
    if not watermark_on(document):
        return None
    return {"watermark": stamped is not None}


def register(app: Flask, limiter: Limiter) -> None:
    app.extensions["mailbridge_stamping"] = threading.BoundedSemaphore(STAMPING_AT_ONCE)
    app.register_blueprint(bp)
