"""The documents in a message: MIME parts walked through forwards, checked against the limits.

Signatures (S/MIME, PGP) and small inline signature images are skipped; the type comes from
the content (mailbridge/filenames.py), never from what the sender claims.
"""

from __future__ import annotations

import email.message
import re
import urllib.parse
from dataclasses import dataclass

from mailbridge.mail.filetypes import KIND_CONTENT_TYPES, detect_kind, sanitise_filename
from mailbridge.mail.mime import (
    NestedTooDeeply,
    children,
    content_type,
    header_text,
    is_document_candidate,
    part_filename,
    part_text,
    payload,
)
from mailbridge.outcomes import Notice, Reject
from mailbridge.settings import LimitSettings

_TNEF_TYPES = {"application/ms-tnef", "application/vnd.ms-tnef"}
_SIGNATURE_TYPES = {"application/pkcs7-signature", "application/x-pkcs7-signature",
                    "application/pgp-signature"}
_CID_REF = re.compile(r"cid:([^\s\"'<>()]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Attachment:
    filename: str       # sanitised display name, never used as a path
    kind: str           # one of config.DEFAULT_ALLOWED_TYPES
    content_type: str   # the MIME type we serve it as (from kind, not from the sender)
    data: bytes


def find_attachments(msg: email.message.EmailMessage,
                     limits: LimitSettings) -> list[Attachment] | Reject:
    """The documents in `msg` (also inside forwarded messages), checked against `limits`."""
    walked = _walk(msg, limits)
    if isinstance(walked, Reject):
        return walked
    leaves, inline_ids = walked
    documents: list[Attachment] = []
    total = 0
    for part in leaves:
        document = _document(part, inline_ids, limits, len(documents) + 1)
        if document is None:
            continue
        if isinstance(document, Reject):
            return document
        total += len(document.data)
        if total > limits.max_total_bytes:
            return Reject(Notice.TOO_LARGE_TOTAL,
                          "the attachments together are larger than allowed",
                          {"limit_bytes": limits.max_total_bytes})
        documents.append(document)
    if not documents:
        return Reject(Notice.NO_ATTACHMENTS, "the message has no documents")
    return documents


def _walk(msg: email.message.Message,
          limits: LimitSettings) -> tuple[list[email.message.Message], set[str]] | Reject:
    """Leaf parts in order, and the Content-IDs that HTML parts show inline, within limits."""
    if any(isinstance(d, NestedTooDeeply) for d in msg.defects):
        return Reject(Notice.TOO_DEEP, "the message is nested too deeply",
                      {"limit": limits.max_depth})
    leaves: list[email.message.Message] = []
    inline_ids: set[str] = set()
    count = 0
    stack = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        count += 1
        if count > limits.max_parts:
            return Reject(Notice.TOO_MANY_PARTS, "the message has too many MIME parts",
                          {"limit": limits.max_parts})
        if depth > limits.max_depth:
            return Reject(Notice.TOO_DEEP, "the message is nested too deeply",
                          {"limit": limits.max_depth})
        if part.is_multipart():
            stack.extend((child, depth + 1) for child in reversed(children(part)))
            continue
        leaves.append(part)
        if content_type(part) == "text/html" and not is_document_candidate(part):
            inline_ids.update(_cid_references(part_text(part)))
    return leaves, inline_ids


def _document(part: email.message.Message, inline_ids: set[str], limits: LimitSettings,
              number: int) -> Attachment | Reject | None:
    """The leaf as the `number`th document; None if it is no document (body text, signature,
    empty, inline image)."""
    if not is_document_candidate(part) or _is_signature(part):
        return None
    name = part_filename(part)
    if _is_tnef(part, name):
        return Reject(Notice.TNEF, "Outlook rich-text message (winmail.dat)")
    data = payload(part)
    if data is None:
        return Reject(Notice.UNREADABLE_ATTACHMENT, "an attachment could not be decoded",
                      {"filename": sanitise_filename(name, None, number)})
    if not data or _is_inline_image(part, data, inline_ids, limits):
        return None
    return _checked_file(name, data, limits, number)


def _checked_file(name: str, data: bytes, limits: LimitSettings,
                  number: int) -> Attachment | Reject:
    """The file as an Attachment if its size and detected type are allowed."""
    if len(data) > limits.max_file_bytes:
        return Reject(Notice.TOO_LARGE, "an attachment is larger than allowed",
                      {"filename": sanitise_filename(name, None, number),
                       "limit_bytes": limits.max_file_bytes})
    kind = detect_kind(data)
    if kind is None or kind not in limits.allowed_types:
        return Reject(Notice.DISALLOWED_TYPE, "an attachment is not of an allowed type",
                      {"filename": sanitise_filename(name, None, number),
                       "allowed": list(limits.allowed_types)})
    return Attachment(filename=sanitise_filename(name, kind, number), kind=kind,
                      content_type=KIND_CONTENT_TYPES[kind], data=data)


def _is_signature(part: email.message.Message) -> bool:
    # S/MIME and PGP signatures ride along as parts; they are not documents to share.
    return (content_type(part) in _SIGNATURE_TYPES
            or part_filename(part).strip().lower() == "smime.p7s")


def _is_tnef(part: email.message.Message, name: str) -> bool:
    return content_type(part) in _TNEF_TYPES or name.strip().lower() == "winmail.dat"


def _cid_references(source: str) -> set[str]:
    return {_content_id(urllib.parse.unquote(ref)) for ref in _CID_REF.findall(source)}


def _content_id(text: str) -> str:
    return text.strip().strip("<>").strip().lower()


def _is_inline_image(part: email.message.Message, data: bytes, inline_ids: set[str],
                     limits: LimitSettings) -> bool:
    """A small image the HTML body shows inline (a logo in a signature), not a document."""
    if len(data) > limits.inline_image_max_bytes:
        return False
    cid = _content_id(header_text(part, "Content-ID"))
    if not cid or cid not in inline_ids:
        return False
    return (content_type(part).startswith("image/")
            or detect_kind(data) in ("png", "jpeg", "gif", "tiff", "heic"))


def uploaded_file(name: str, data: bytes, limits: LimitSettings,
                  number: int) -> Attachment | Reject:
    """A file uploaded in the portal (a document sent back), under intake's own rules: size
    and type by content, the name made safe."""
    return _checked_file(name, data, limits, number)
