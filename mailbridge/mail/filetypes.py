"""Document types decided by content (magic bytes), and attachment names made safe to show.

Neither the sender's Content-Type nor the file extension decides what a document is.
"""

from __future__ import annotations

import io
import re
import unicodedata
import zipfile

import filetype

MAX_NAME_CHARS = 150

# The type we serve each kind as; decided here, never taken from the sender.
KIND_CONTENT_TYPES: dict[str, str] = {
    "pdf": "application/pdf",
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "tiff": "image/tiff",
    "heic": "image/heic",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "doc": "application/msword",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "rtf": "application/rtf",
    "txt": "text/plain",
}

# Extensions a name may keep for each kind; the first is appended when the name has none of them.
KIND_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "pdf": (".pdf",),
    "png": (".png",),
    "jpeg": (".jpg", ".jpeg", ".jpe"),
    "gif": (".gif",),
    "tiff": (".tif", ".tiff"),
    "heic": (".heic", ".heif"),
    "docx": (".docx",),
    "doc": (".doc",),
    "xlsx": (".xlsx",),
    "rtf": (".rtf",),
    # .html/.xml/.svg are not here on purpose: a downloaded text file must not open as a page.
    "txt": (".txt", ".text", ".csv", ".log"),
}

_FILETYPE_KINDS = {"pdf": "pdf", "png": "png", "jpg": "jpeg", "gif": "gif", "tif": "tiff",
                   "heic": "heic", "rtf": "rtf"}
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_MAGIC = b"PK\x03\x04"
_PRINTABLE_SHARE = 0.95
_PRINTABLE_BYTES = bytes(b for b in range(256) if chr(b).isprintable() or chr(b) in "\t\r\n\f")


def detect_kind(data: bytes) -> str | None:
    """The document kind of `data` judged by its bytes, or None when it is none we know."""
    if not data:
        return None
    if data.startswith(_OLE2_MAGIC):
        return "doc"
    if data.startswith(_ZIP_MAGIC):
        return _office_kind(data)
    guess = filetype.guess(data)
    kind = _FILETYPE_KINDS.get(guess.extension) if guess is not None else None
    if kind is not None:
        return kind
    # Some magic numbers are plain letters ("BM" is a bitmap), so text is judged on its own.
    return "txt" if _is_text(data) else None


def _office_kind(data: bytes) -> str | None:
    # Read the zip's directory rather than trusting the first entries' names.
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
        return None
    if "[Content_Types].xml" not in names:
        return None
    if "word/document.xml" in names:
        return "docx"
    if "xl/workbook.xml" in names:
        return "xlsx"
    return None


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        pass
    # Legacy 8-bit text (Latin-1, Windows-1252 ...): mostly printable once decoded.
    unprintable = len(data.translate(None, _PRINTABLE_BYTES))
    return unprintable <= (1 - _PRINTABLE_SHARE) * len(data)


def sanitise_filename(name: str | None, kind: str | None, index: int) -> str:
    """A display name that is safe to show and offer for download; never a storage path.

    Keeps only the last path component, drops control and bidi/format characters, NFC-normalises,
    collapses whitespace, strips leading dots, gives it the extension of `kind` (None leaves the
    extension alone) and caps it at MAX_NAME_CHARS. An empty result becomes document-<index>.
    """
    text = unicodedata.normalize("NFC", name or "")
    text = "".join(" " if ch.isspace() else ch for ch in text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    text = re.split(r"[/\\]", text)[-1]
    text = unicodedata.normalize("NFC", " ".join(text.split()))
    text = text.lstrip(". ").rstrip(". ")
    stem, ext = _split_extension(text, kind)
    if not stem:
        stem = f"document-{index}"
    stem = stem[:MAX_NAME_CHARS - len(ext)].rstrip(". ")
    return unicodedata.normalize("NFC", stem + ext)


def _split_extension(text: str, kind: str | None) -> tuple[str, str]:
    """(stem, extension) where the extension suits `kind`; a wrong one stays in the stem."""
    dot = text.rfind(".")
    current = text[dot:] if dot > 0 else ""
    if kind is None:
        if current and len(current) <= 10:
            return text[:dot].rstrip(". "), current
        return text, ""
    allowed = KIND_EXTENSIONS[kind]
    if current.lower() in allowed:
        return text[:dot].rstrip(". "), current.lower()
    return text, allowed[0]
