"""The text of an HTML mail part as a person sees it: lines of visible text, with everything a
mail client would not show left out — `display:none`, `visibility:hidden`, the `hidden` and
`aria-hidden` attributes, zero-size or zero-opacity styles, `<head>`, `<style>`, `<template>`,
and elements a style sheet in the message hides.

Parsed with html5lib, which builds the tree exactly as browsers do (the HTML5 algorithm), so
markup that a browser moves inside a hidden element is hidden here too. Never raises.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # noqa: S405 - only walks a tree html5lib built; parses nothing
from dataclasses import dataclass, field

import html5lib

# HTML5 parsing is linear but slow in pure Python; a reply's command is at the very top.
MAX_SCAN_CHARS = 16 * 1024
# Style sheets are looked for in more of the part: they sit in <head>, before the text.
MAX_STYLE_CHARS = 1024 * 1024

BREAKS = frozenset({"br", "p", "div", "li", "tr", "table", "pre", "h1", "h2", "h3", "h4",
                    "h5", "h6", "ul", "ol", "hr", "blockquote", "dd", "dt", "section",
                    "article", "header", "footer", "center"})
HIDDEN_TAGS = frozenset({"head", "style", "script", "template", "title", "noscript",
                         "object", "iframe", "svg", "math"})
QUOTE_CLASSES = frozenset({"gmail_quote", "gmail_quote_container", "gmail_attr",
                           "gmail_signature", "yahoo_quoted", "moz-cite-prefix",
                           "moz-signature", "outlookmessageheader"})
QUOTE_IDS = frozenset({"divrplyfwdmsg", "appendonsend"})

_STYLE_BLOCK = re.compile(r"<style\b[^>]*>(.*?)(?:</style\s*>|\Z)", re.IGNORECASE | re.DOTALL)
_CSS_RULE = re.compile(r"([^{}]*)\{([^{}]*)\}")
_CSS_COMMENT = re.compile(r"/\*.*?(?:\*/|\Z)", re.DOTALL)
_ZERO = re.compile(r"[+-]?0*(?:\.0*)?(?:[a-z%]+)?")
_FAR_NEGATIVE = re.compile(r"-\s*\d{3,}(?:\.\d*)?\s*(?:px|pt|em|rem|cm|mm|in|%)?")


@dataclass
class _Hiders:
    """Selectors of the message's own style sheets whose rules hide what they match."""

    classes: set[str] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)

    def match(self, tag: str, attrs: dict[str, str]) -> bool:
        return (tag in self.tags or attrs.get("id", "").lower() in self.ids
                or bool(self.classes & set(attrs.get("class", "").lower().split())))


def visible_lines(source: str, *, stop_at_quote: bool = False) -> list[str]:
    """The visible text lines at the top of `source`. With `stop_at_quote`, nothing from the
    first quoted block on (blockquote, Gmail/Outlook/Thunderbird quote containers)."""
    try:
        hiders = _style_sheet_hiders(source[:MAX_STYLE_CHARS])
        head = _STYLE_BLOCK.sub("", source[:MAX_STYLE_CHARS])[:MAX_SCAN_CHARS]
        document = html5lib.parse(head, treebuilder="etree", namespaceHTMLElements=False)
        return _Lines(hiders, stop_at_quote).walk(document)
    except Exception:  # noqa: BLE001 - hostile markup must not stop the worker
        return []


def hides(style: str) -> bool:
    """Does an inline style (or a rule's declarations) keep the element's text from view?"""
    for declaration in _CSS_COMMENT.sub("", style).split(";"):
        name, _, value = declaration.partition(":")
        name = name.strip().lower()
        value = value.lower().replace("!important", "").strip()
        if not value:
            continue
        if name == "display" and value == "none":
            return True
        if name == "visibility" and value in ("hidden", "collapse"):
            return True
        if name == "mso-hide" and value == "all":
            return True
        if name in ("opacity", "font-size", "height", "max-height", "width", "max-width",
                    "line-height") and _ZERO.fullmatch(value.replace(" ", "")):
            return True
        if name in ("text-indent", "left", "top", "margin-left", "margin-top") \
                and _FAR_NEGATIVE.fullmatch(value):
            return True  # pushed off the screen
    return False


def _style_sheet_hiders(source: str) -> _Hiders:
    hiders = _Hiders()
    for sheet in _STYLE_BLOCK.findall(source):
        for selectors, declarations in _CSS_RULE.findall(_CSS_COMMENT.sub("", sheet)):
            if not hides(declarations):
                continue
            for selector in selectors.split(","):
                # The last compound selector names the elements hidden; anything it mentions
                # counts, which may hide a little too much but never too little.
                last = re.split(r"[\s>+~]+", selector.strip())[-1].lower()
                hiders.classes.update(re.findall(r"\.([\w-]+)", last))
                hiders.ids.update(re.findall(r"#([\w-]+)", last))
                tag = re.match(r"[a-z][a-z0-9]*", last)
                if tag:
                    hiders.tags.add(tag.group(0))
    return hiders


class _Lines:
    def __init__(self, hiders: _Hiders, stop_at_quote: bool) -> None:
        self.hiders = hiders
        self.stop_at_quote = stop_at_quote
        self.lines: list[str] = []
        self.current: list[str] = []

    def walk(self, root: ET.Element) -> list[str]:
        # Iterative: hostile mail nests deeper than Python's recursion limit.
        stack: list[tuple[str, ET.Element, int]] = [("enter", root, 0)]
        while stack:
            phase, element, pre = stack.pop()
            if phase == "tail":
                self._text(element.tail, pre)
                continue
            if phase == "exit":
                if element.tag in BREAKS:
                    self._break()
                self._text(element.tail, pre)
                continue
            if not isinstance(element.tag, str):  # a comment or processing instruction
                stack.append(("tail", element, pre))
                continue
            tag = element.tag.lower()
            attrs = {k.lower(): (v or "") for k, v in element.attrib.items()}
            if self.stop_at_quote and _is_quote(tag, attrs):
                self._break()
                break
            if self._hidden(tag, attrs):
                stack.append(("tail", element, pre))
                continue
            if tag in BREAKS:
                self._break()
            inner = pre + (tag == "pre")
            self._text(element.text, inner)
            stack.append(("exit", element, pre))
            stack.extend(("enter", child, inner) for child in reversed(list(element)))
        self._break()
        return self.lines

    def _hidden(self, tag: str, attrs: dict[str, str]) -> bool:
        return (tag in HIDDEN_TAGS or "hidden" in attrs
                or attrs.get("aria-hidden", "").strip().lower() == "true"
                or (tag == "input" and attrs.get("type", "").lower() == "hidden")
                or hides(attrs.get("style", "")) or self.hiders.match(tag, attrs))

    def _text(self, text: str | None, pre: int) -> None:
        if not text:
            return
        if not pre:
            self.current.append(re.sub(r"\s+", " ", text))
            return
        *done, rest = text.replace("\r", "").split("\n")
        for piece in done:
            self.current.append(piece)
            self._break(keep_empty=True)
        self.current.append(rest)

    def _break(self, keep_empty: bool = False) -> None:
        line = "".join(self.current)
        if line.strip() or keep_empty or (self.lines and self.lines[-1].strip()):
            self.lines.append(line)
        self.current = []


def _is_quote(tag: str, attrs: dict[str, str]) -> bool:
    return (tag == "blockquote"
            or bool(QUOTE_CLASSES & set(attrs.get("class", "").lower().split()))
            or attrs.get("id", "").lower() in QUOTE_IDS)
