"""Document kinds by content, and attachment names made safe to show."""

from __future__ import annotations

import io
import struct
import unicodedata
import zipfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.mail.filetypes import (
    KIND_CONTENT_TYPES,
    KIND_EXTENSIONS,
    MAX_NAME_CHARS,
    detect_kind,
    sanitise_filename,
)
from mailbridge.settings import DEFAULT_ALLOWED_TYPES

PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


def png_bytes() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def zip_bytes(*names: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, "<xml/>")
    return buffer.getvalue()


@pytest.mark.parametrize(("data", "kind"), [
    (PDF, "pdf"),
    (png_bytes(), "png"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01" + b"\x00" * 20, "jpeg"),
    (b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + b"\x00" * 10, "gif"),
    (b"II*\x00\x08\x00\x00\x00" + b"\x00" * 20, "tiff"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 20, "heic"),
    (zip_bytes("[Content_Types].xml", "_rels/.rels", "word/document.xml"), "docx"),
    (zip_bytes("[Content_Types].xml", "_rels/.rels", "xl/workbook.xml"), "xlsx"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504, "doc"),
    (b"{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Times;}} Hello}", "rtf"),
    ("Patient seen today; plan unchanged. ✓\n".encode(), "txt"),
    ("Café crème, état stable\r\n".encode("cp1252"), "txt"),
    (b"BMI 31, BP 120/80\n", "txt"),  # "BM" is also the bitmap magic number
])
def test_kind_is_decided_by_content(data, kind):
    assert detect_kind(data) == kind


@pytest.mark.parametrize("data", [
    b"",
    b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00",  # Windows executable
    zip_bytes("setup.exe", "readme.txt"),  # a zip, but not an Office document
    zip_bytes("word/document.xml"),  # lacks [Content_Types].xml
    b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03",  # gzip
    bytes(range(256)) * 4,  # binary with NUL bytes
    b"PK\x03\x04 truncated",
])
def test_unknown_or_unsafe_content_has_no_kind(data):
    assert detect_kind(data) is None


def test_every_allowed_kind_has_a_content_type_and_extension():
    assert set(KIND_CONTENT_TYPES) == set(DEFAULT_ALLOWED_TYPES) == set(KIND_EXTENSIONS)


@pytest.mark.parametrize(("name", "kind", "expected"), [
    ("1234/../../1234.txt", "txt", "1234.txt"),
    ("C:\\Users\\frontdesk\\Desktop\\plan.pdf", "pdf", "plan.pdf"),
    ("invoice\u202efdp.exe", "pdf", "invoicefdp.exe.pdf"),
    ("report\x00\x07\x1b.pdf", "pdf", "report.pdf"),
    (".htaccess", "txt", "htaccess.txt"),
    ("...", "pdf", "document-3.pdf"),
    ("", "pdf", "document-3.pdf"),
    (None, "png", "document-3.png"),
    ("scan", "pdf", "scan.pdf"),
    ("scan.dat", "pdf", "scan.dat.pdf"),
    ("Photo.JPG", "jpeg", "Photo.jpg"),
    ("photo.jpeg", "jpeg", "photo.jpeg"),
    ("page.html", "txt", "page.html.txt"),
    ("  Plan   of\tcare \n(signed).pdf  ", "pdf", "Plan of care (signed).pdf"),
    ("Kontoutskrift 1506\nBedriftskonto.pdf", "pdf", "Kontoutskrift 1506 Bedriftskonto.pdf"),
    (unicodedata.normalize("NFD", "Röntgen Müller.pdf"), "pdf", "Röntgen Müller.pdf"),
    ("setup.exe", None, "setup.exe"),
    ("", None, "document-3"),
])
def test_names_are_sanitised(name, kind, expected):
    assert sanitise_filename(name, kind, 3) == expected


def test_long_names_are_capped_keeping_the_extension():
    name = sanitise_filename("Ä" * 400 + ".pdf", "pdf", 1)
    assert len(name) == MAX_NAME_CHARS
    assert name.endswith("Ä.pdf")


NASTY = st.text(alphabet=st.one_of(
    st.sampled_from(list("/\\.. \t\n\r\x00\x07\x1b\x7f\x85\u200b\u200e\u200f\u202a\u202e"
                         "\u2066\u2069\ufeff\u2028\u0301\u0308e\u00e9\u0958Ab1-_")),
    st.characters(),
), max_size=400)


@settings(max_examples=300, deadline=None)
@given(name=NASTY, kind=st.sampled_from([*DEFAULT_ALLOWED_TYPES, None]),
       index=st.integers(min_value=1, max_value=999))
def test_any_name_becomes_a_safe_display_name(name, kind, index):
    safe = sanitise_filename(name, kind, index)
    assert safe
    assert len(safe) <= MAX_NAME_CHARS
    assert "/" not in safe and "\\" not in safe
    assert not any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in safe)
    assert unicodedata.is_normalized("NFC", safe)
    assert not safe.startswith((".", " ")) and not safe.endswith(" ")
    assert "  " not in safe
    assert all(ch == " " or not ch.isspace() for ch in safe)
    if kind is not None:
        assert safe.lower().endswith(KIND_EXTENSIONS[kind])
