"""PHI taken from a member's message — share titles, notes, document names, and error text that
may quote a message — is sealed in the database like the documents themselves (AES-256-GCM,
a key derived from the master key) and opened only where it is shown. Each value is bound to
its table, column and row id, so it cannot be moved to another row or column unnoticed."""

from __future__ import annotations

import logging

from cryptography.exceptions import InvalidTag

from mailbridge.store.blobs import seal, unseal
from mailbridge.store.models import Document, InboundMessage, Share

log = logging.getLogger(__name__)

UNREADABLE = "(unreadable)"


def seal_text(key: bytes, table: str, column: str, row_id: int, text: str) -> bytes:
    """b"" for empty text (nothing to hide, and no ciphertext to store)."""
    if not text:
        return b""
    return seal(key, text.encode("utf-8"), _aad(table, column, row_id))


def open_text(key: bytes, table: str, column: str, row_id: int, sealed: bytes | None) -> str:
    if not sealed:
        return ""
    try:
        return unseal(key, bytes(sealed), _aad(table, column, row_id)).decode("utf-8")
    except (InvalidTag, ValueError):
        # Wrong master key, or a value copied from another row: never shown as if it were
        # this row's. Logged without the value.
        log.error("%s #%d: sealed %s does not open", table, row_id, column)
        return UNREADABLE


def seal_share(key: bytes, share: Share, title: str, note_html: str) -> None:
    """Store the title and note of a share just created (its id is part of the seal)."""
    share.title_sealed = seal_text(key, "share", "title", share.id, title)
    share.note_sealed = seal_text(key, "share", "note", share.id, note_html)
    (Share.update(title_sealed=share.title_sealed, note_sealed=share.note_sealed)
     .where(Share.id == share.id).execute())


def share_title(key: bytes, share: Share) -> str:
    return open_text(key, "share", "title", share.id, share.title_sealed)


def share_note(key: bytes, share: Share) -> str:
    return open_text(key, "share", "note", share.id, share.note_sealed)


def seal_document_name(key: bytes, document: Document, name: str) -> None:
    document.name_sealed = seal_text(key, "document", "name", document.id, name)
    Document.update(name_sealed=document.name_sealed).where(Document.id == document.id).execute()


def document_name(key: bytes, document: Document) -> str:
    return open_text(key, "document", "name", document.id, document.name_sealed)


def seal_error(key: bytes, row: InboundMessage, text: str) -> None:
    """A traceback of a message that broke the worker: its exception text may quote the
    message. Runs in the caller's transaction."""
    (InboundMessage.update(error_sealed=seal_text(key, "inbound_message", "error",
                                                  row.id, text))
     .where(InboundMessage.id == row.id).execute())


def inbound_error(key: bytes, row: InboundMessage) -> str:
    return open_text(key, "inbound_message", "error", row.id, row.error_sealed)


def _aad(table: str, column: str, row_id: int) -> bytes:
    return f"phi\x00{table}\x00{column}\x00{row_id}".encode()
