"""Watermarks stamped on a copy as it is handed out: a footer line on every PDF page (pypdf,
merged from a tiny overlay page we write ourselves) and a margin band under images (Pillow)."""

from __future__ import annotations

import io
import logging

log = logging.getLogger(__name__)

PDF_KINDS = ("pdf",)
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF"}
STAMPABLE_KINDS = (*PDF_KINDS, *IMAGE_FORMATS)

# Decoding a small file into a huge canvas is a memory attack; beyond this the image is served
# unstamped (as a type that cannot be stamped) rather than decoded. 50 megapixels is far above
# any scan or photograph a clinic shares.
MAX_IMAGE_PIXELS = 50_000_000
# Stamping costs about a millisecond a page; a small file can declare hundreds of thousands of
# pages, which would hold a portal thread for minutes. Beyond this it is served unstamped.
MAX_PDF_PAGES = 3000
FOOTER_MARGIN = 10.0  # points from the page's visible bottom edge
GRAY = 0.45  # light enough to read past, dark enough to survive a photocopy


def line(address: str, date_text: str, share_id: int) -> str:
    return f"Shared with {address} · {date_text} · share {share_id}"


def stampable(kind: str) -> bool:
    return kind in STAMPABLE_KINDS


def stamp(kind: str, data: bytes, text: str) -> bytes | None:
    """The stamped copy, or None when this document cannot be stamped (its type, an encrypted
    or unreadable PDF or one of too many pages, an image too large to decode): the caller then
    serves the original."""
    try:
        if kind in PDF_KINDS:
            return stamp_pdf(data, text)
        if kind in IMAGE_FORMATS:
            return stamp_image(data, text, IMAGE_FORMATS[kind])
    except Exception as exc:  # noqa: BLE001 - a hostile file must not break the download
        log.warning("watermark: a %s could not be stamped (%s)", kind, type(exc).__name__)
    return None


# --- PDF --------------------------------------------------------------------------------------


def _pdf_text(text: str) -> bytes:
    """A PDF string in WinAnsiEncoding (Helvetica's): "·" is 0xB7 there; characters outside
    it become "?" rather than break the page."""
    raw = text.encode("cp1252", errors="replace")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _overlay_pdf(box: tuple[float, float, float, float], rotate: int, text: str) -> bytes:
    """One page the size of `box` with `text` as a footer where the reader sees the bottom of
    the page (a /Rotate'd page turns its user space; the footer turns with it)."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    along = height if rotate in (90, 270) else width  # the visible bottom edge's length
    # Helvetica averages about half an em per character; shrink long lines to fit the edge.
    size = max(3.0, min(8.0, (along - 2 * FOOTER_MARGIN) / (0.52 * max(len(text), 1))))
    m = FOOTER_MARGIN
    matrix = {0: (1, 0, 0, 1, x0 + m, y0 + m),
              90: (0, 1, -1, 0, x1 - m, y0 + m),
              180: (-1, 0, 0, -1, x1 - m, y1 - m),
              270: (0, -1, 1, 0, x0 + m, y1 - m)}[rotate]
    stream = (b"q %.3f g BT /MBWm %.2f Tf %s Tm (%s) Tj ET Q"
              % (GRAY, size, " ".join(f"{v:g}" for v in matrix).encode(), _pdf_text(text)))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [%s] /Contents 4 0 R "
               b"/Resources << /Font << /MBWm 5 0 R >> >> >>"
               % " ".join(f"{v:g}" for v in box).encode(),
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
               b"/Encoding /WinAnsiEncoding >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer << /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def stamp_pdf(data: bytes, text: str) -> bytes | None:
    from pypdf import PdfReader, PdfWriter

    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        return None  # rewriting it would drop the sender's protection; served as it is
    if len(reader.pages) > MAX_PDF_PAGES:
        return None
    writer = PdfWriter(clone_from=reader)
    overlays: dict[tuple, object] = {}
    for page in writer.pages:
        box = tuple(float(v) for v in page.cropbox)
        rotate = (page.rotation or 0) % 360
        key = (box, rotate)
        if key not in overlays:
            overlays[key] = PdfReader(io.BytesIO(_overlay_pdf(box, rotate, text))).pages[0]
        page.merge_page(overlays[key])
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# --- images -----------------------------------------------------------------------------------


def stamp_image(data: bytes, text: str, image_format: str) -> bytes | None:
    from PIL import Image, ImageOps, ImageSequence

    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            return None
        frames = [_banded(ImageOps.exif_transpose(frame.copy()), text)
                  for frame in ImageSequence.Iterator(image)]
        out = io.BytesIO()
        if image_format == "GIF":
            frames[0].save(out, "GIF", save_all=len(frames) > 1, append_images=frames[1:],
                           loop=image.info.get("loop", 0),
                           duration=image.info.get("duration", 100))
        elif image_format == "JPEG":
            frames[0].convert("RGB").save(out, "JPEG", quality=90)
        else:
            frames[0].save(out, "PNG")
        return out.getvalue()


def _banded(image, text: str):
    """The image with a white band under it holding `text` (the picture itself untouched)."""
    from PIL import Image, ImageDraw, ImageFont

    mode = "RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB"
    image = image.convert(mode)
    size = max(10, min(28, image.width // 60))
    font = ImageFont.load_default(size=size)
    band = size * 2
    white = (255, 255, 255, 255) if mode == "RGBA" else (255, 255, 255)
    canvas = Image.new(mode, (image.width, image.height + band), white)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    # Shrink the font until the line fits the width (narrow images: long addresses).
    while size > 6 and draw.textlength(text, font=font) > image.width - size:
        size -= 1
        font = ImageFont.load_default(size=size)
    draw.text((size // 2, image.height + band // 2), text, fill=(90, 90, 90), font=font,
              anchor="lm")
    return canvas
