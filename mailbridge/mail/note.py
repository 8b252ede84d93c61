"""The sender's note: the body without the recipient lines, as safe HTML for the portal.

HTML is sanitised with bleach (a small allow-list); plain text is escaped.
"""

from __future__ import annotations

import email.message
import html
import re

import bleach

from mailbridge.mail.mime import content_type, part_text
from mailbridge.mail.recipients import recipient_lines
from mailbridge.mail.text import (
    MAX_NOTE_HTML_CHARS,
    body_part,
    html_lines,
    plain_lines,
    visible_html,
)

MAX_NOTE_CHARS = 20_000
MAX_HTML_DEPTH = 256

NOTE_TAGS = frozenset({
    "p", "br", "b", "strong", "i", "em", "u", "ul", "ol", "li", "blockquote", "a", "div",
    "span", "pre", "code", "h1", "h2", "h3", "h4",
    "table", "thead", "tbody", "tfoot", "tr", "th", "td", "caption",
})
NOTE_ATTRIBUTES = {"a": ["href", "title"], "td": ["colspan", "rowspan"],
                   "th": ["colspan", "rowspan"]}
NOTE_PROTOCOLS = frozenset({"http", "https", "mailto"})

_HTML_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)")
# Tags that never nest (void) or that HTML closes implicitly: they add no depth.
_FLAT_TAGS = frozenset({"br", "img", "hr", "meta", "link", "input", "col", "area", "base",
                        "wbr", "source", "embed", "param", "track", "p", "li", "td", "th",
                        "tr", "dt", "dd", "option"})


def sender_note(msg: email.message.EmailMessage) -> str:
    """The member's note as safe HTML: the body without the recipient lines at the top."""
    part = body_part(msg)
    if part is None:
        return ""
    text = part_text(part)
    if content_type(part) == "text/html":
        return _html_note(visible_html(text))
    lines = plain_lines(part, text[:MAX_NOTE_HTML_CHARS])
    _, used = recipient_lines(lines)
    return _plain_note("\n".join(lines[used:]))


def _plain_note(text: str) -> str:
    return html.escape(text.strip("\n")[:MAX_NOTE_CHARS]).replace("\n", "<br>")


def _html_note(source: str) -> str:
    lines = html_lines(source)
    _, used = recipient_lines([line for line, _ in lines])
    if used:
        source = source[lines[used - 1][1]:]
    if _nesting_depth(source) > MAX_HTML_DEPTH:
        # Broken or hostile HTML would take html5lib minutes: keep just the words.
        text = html.unescape(re.sub(r"<[^<>]*(>|\Z)", " ", source))
        return _plain_note(" ".join(text.split()))
    note = _clean_html(source)
    if len(note) > MAX_NOTE_CHARS:
        note = _clean_html(note[:MAX_NOTE_CHARS])  # re-clean: the cut may split a tag
    return note


def _nesting_depth(source: str) -> int:
    depth = deepest = 0
    for match in _HTML_TAG.finditer(source):
        if match.group(2).lower() in _FLAT_TAGS:
            continue
        depth = max(0, depth - 1) if match.group(1) else depth + 1
        deepest = max(deepest, depth)
    return deepest


def _clean_html(source: str) -> str:
    return bleach.clean(source, tags=NOTE_TAGS, attributes=NOTE_ATTRIBUTES,
                        protocols=NOTE_PROTOCOLS, strip=True, strip_comments=True).strip()
