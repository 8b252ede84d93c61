"""The HTML part of e-mails that have no template of their own: their text part, read as
people write plain text — paragraphs, "- " lists and "label: value" lines (which become a
table) — so every e-mail reads well in a client that shows HTML in a proportional font."""

from __future__ import annotations

import re

from markupsafe import Markup, escape

LIST_ITEM = re.compile(r"^\s*[-•] (.+)$")
LABELLED = re.compile(r"^\s*([^:\s][^:]{0,48}): (\S.*)$")
URL = re.compile(r"https?://[^\s<>\"']+")
FOOTER = "\n-- \n"  # the signature separator before base.txt's closing line


def text_to_html(text: str) -> Markup:
    body = text.split(FOOTER, 1)[0].strip("\n")
    parts = []
    for block in re.split(r"\n[ \t]*\n", body):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if all(LIST_ITEM.match(line) for line in lines):
            items = "".join(f"<li>{_inline(LIST_ITEM.match(line).group(1))}</li>"
                            for line in lines)
            parts.append(f"<ul>{items}</ul>")
        elif len(lines) > 1 and all(LABELLED.match(line) for line in lines):
            parts.append(table([LABELLED.match(line).groups() for line in lines]))
        else:
            parts.append("<p>" + "<br>\n".join(_inline(line.strip()) for line in lines)
                         + "</p>")
    return Markup("\n".join(parts))  # noqa: S704 - every piece of text was escaped above


def table(rows) -> str:
    cells = "".join(
        '<tr><th scope="row" style="text-align: left; vertical-align: top; padding: 2px '
        f'1em 2px 0; font-weight: 600;">{_inline(label)}</th>'
        f'<td style="padding: 2px 0;">{_inline(value)}</td></tr>' for label, value in rows)
    return f'<table role="presentation" style="border-collapse: collapse;">{cells}</table>'


def _inline(text: str) -> str:
    escaped = str(escape(text))
    return URL.sub(lambda m: f'<a href="{m.group(0)}">{m.group(0)}</a>', escaped)
