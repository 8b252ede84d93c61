"""The one body-text reader: which part is the member's own body (never an attachment, never
one inside a forwarded message), and that part as text lines — plain (also format=flowed) or
HTML. Recipient lines, the note and reply commands are all read from here.
"""

from __future__ import annotations

import email.message
import re
from html.parser import HTMLParser

from mailbridge.mail.mime import children, content_type, is_document_candidate, part_text

# Recipient lines sit at the very top; a bigger prefix than this is never needed to find them.
MAX_BODY_SCAN_CHARS = 64 * 1024
# html5lib (inside bleach) and HTMLParser slow down badly on huge or deeply nested input;
# no note needs more HTML than this, and recipient lines are found near the top.
MAX_NOTE_HTML_CHARS = 100_000
MAX_HTML_SCAN_CHARS = 16 * 1024

_HIDDEN_HTML = re.compile(r"<(script|style|head|title|template)\b.*?(</\1\s*>|\Z)",
                          re.IGNORECASE | re.DOTALL)


def body_part(msg: email.message.Message) -> email.message.Message | None:
    """The first text/plain body part if it has any text, else the first text/html one;
    never an attachment or a part inside a forwarded message."""
    first_plain = first_html = None
    stack = [msg]
    while stack and first_plain is None:
        part = stack.pop()
        kind = content_type(part)
        if part.is_multipart():
            if not kind.startswith("message/"):
                stack.extend(reversed(children(part)))
            continue
        if is_document_candidate(part):
            continue
        if kind == "text/plain" and part_text(part).strip():
            first_plain = part
        elif kind == "text/html" and first_html is None:
            first_html = part
    return first_plain or first_html


def is_html(part: email.message.Message) -> bool:
    return content_type(part) == "text/html"


def body_lines(msg: email.message.Message) -> list[str]:
    """The top of the body as visible text lines ([] if the message has no body text)."""
    part = body_part(msg)
    if part is None:
        return []
    text = part_text(part)
    if content_type(part) == "text/html":
        return [line for line, _ in html_lines(visible_html(text))]
    return plain_lines(part, text[:MAX_BODY_SCAN_CHARS])


def plain_lines(part: email.message.Message, text: str) -> list[str]:
    """`text` (the content of `part`) as lines, with format=flowed lines joined."""
    lines = text.splitlines()
    try:
        flowed = str(part.get_param("format", "")).lower() == "flowed"
    except Exception:  # noqa: BLE001
        flowed = False
    return _unflow(lines) if flowed else lines


def _unflow(lines: list[str]) -> list[str]:
    # RFC 3676: a line ending in a space continues on the next (the signature mark excepted).
    out: list[str] = []
    pending = ""
    for line in lines:
        pending += line
        if not line.endswith(" ") or line == "-- ":
            out.append(pending)
            pending = ""
    if pending:
        out.append(pending)
    return out


def visible_html(source: str) -> str:
    """The HTML without head, style and script blocks (bleach would keep their text)."""
    return _HIDDEN_HTML.sub("", source[:4 * MAX_NOTE_HTML_CHARS])[:MAX_NOTE_HTML_CHARS]


class _HtmlLines(HTMLParser):
    """HTML as visible text lines, each with the source offset where the line ended."""

    BREAKS = frozenset({"br", "p", "div", "li", "tr", "table", "blockquote", "pre",
                        "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "hr"})
    HIDDEN = frozenset({"script", "style", "head", "title", "template"})

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self.lines: list[tuple[str, int]] = []
        self.current: list[str] = []
        self.hidden = 0

    def _break(self, is_br: bool = False) -> None:
        # Block edges only end a line that has text; <br> also makes blank lines, and a line
        # ended by <br> ends after it (so cutting there does not leave the <br> behind).
        text = "".join(self.current)
        if text.strip() or is_br:
            row, col = self.getpos()
            offset = self.starts[min(row, len(self.starts)) - 1] + col
            if is_br:
                offset += len(self.get_starttag_text() or "")
            self.lines.append((text, offset))
        self.current = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BREAKS:
            self._break(is_br=tag == "br")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in self.BREAKS:
            self._break(is_br=tag == "br")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BREAKS:
            self._break()

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.current.append(data.replace("\r", " ").replace("\n", " "))


def html_lines(source: str) -> list[tuple[str, int]]:
    """Text lines of the first MAX_HTML_SCAN_CHARS of `source` (HTMLParser is quadratic on
    some broken input), each with the offset in `source` where it ends."""
    source = source[:MAX_HTML_SCAN_CHARS]
    parser = _HtmlLines(source)
    try:
        parser.feed(source)
        parser.close()
    except Exception:  # noqa: BLE001 - HTMLParser is lenient, but hostile input is hostile
        pass
    if parser.current:
        parser.lines.append(("".join(parser.current), len(source)))
    return parser.lines
