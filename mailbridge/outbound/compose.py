"""Renders the e-mails mailbridge sends (recipient links, sender receipts, notices) from the
Jinja2 templates in templates/email."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.resources
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path

import jinja2

from mailbridge.clock import system_clock
from mailbridge.outbound.html import text_to_html
from mailbridge.outcomes import Notice
from mailbridge.settings import Settings

# Shipped inside the package (templates/ at the top of the repository is mailbridge.templates).
EMAIL_TEMPLATES = importlib.resources.files("mailbridge.templates") / "email"
SERVICE_NAME = "mailbridge"

NOTICE_CODES = frozenset(Notice)

# Answers to a member's reply command, by command name.
COMMAND_TEMPLATES = {"revoke": "command_revoke.txt", "resend": "command_resend.txt",
                     "extend": "command_extend.txt", "status": "status.txt", "help": "help.txt",
                     "approve": "command_access.txt", "deny": "command_access.txt"}


@dataclass(frozen=True)
class ShareRef:
    """The share a notice to a member is about: named in the notice (title, date, recipients)
    and threaded under the share's receipt with the receipt's subject, so every mail client
    files the notice with the receipt."""

    title: str
    shared_text: str
    recipients: tuple[str, ...]
    receipt_subject: str
    receipt_message_id: str


@dataclass(frozen=True)
class MessageRef:
    """The member's message a notice answers when it made no share: quoted by subject and
    date."""

    subject: str
    date_text: str


def link_url(base_url: str, token: str) -> str:
    """The portal link a recipient gets for a grant's token."""
    return f"{base_url.rstrip('/')}/s/{token}"


def link_email(settings: Settings, *, to: str, link_url: str, clinic_name: str,
               sender_name: str, document_count: int, deadline_text: str, contact: str = "",
               templates: Path | None = None, now: dt.datetime | None = None) -> EmailMessage:
    """The e-mail to one recipient. It carries no PHI: it is never given the subject, the
    filenames or the note, only who shared how many documents, the link and the clinic's
    contact line."""
    values = dict(to=to, link_url=link_url, clinic_name=_one_line(clinic_name),
                  sender_name=_one_line(sender_name), document_count=document_count,
                  deadline_text=deadline_text, contact=_one_line(contact))
    subject, text = _render_text(settings, templates, "link.txt", values)
    html = _render(settings, templates, "link.html", values)
    return _message(settings, to=to, subject=subject, text=text, html=html, now=now,
                    from_name=f"{values['clinic_name']} via {service_name(settings)}")


def receipt_email(settings: Settings, *, to: str, sender_name: str, share_title: str,
                  recipients: list[str], filenames: list[str], deadline_text: str,
                  reply_address: str, in_reply_to: str | None, claim_hours: float | None = None,
                  templates: Path | None = None, now: dt.datetime | None = None
                  ) -> EmailMessage:
    """The receipt to the sender; replying to it (Reply-To) is how the share is managed."""
    values = dict(to=to, sender_name=_one_line(sender_name), share_title=_one_line(share_title),
                  recipients=recipients, filenames=filenames, deadline_text=deadline_text)
    if claim_hours is not None:
        values["claim_hours"] = f"{claim_hours:g}"
    subject, text = _render_text(settings, templates, "receipt.txt", values)
    html = _render(settings, templates, "receipt.html", values)
    return _message(settings, to=to, subject=subject, text=text, html=html, now=now,
                    reply_to=reply_address, in_reply_to=in_reply_to)


def notice_email(settings: Settings, *, to: str, code: str, details: dict,
                 in_reply_to: str | None, about: ShareRef | None = None,
                 original: MessageRef | None = None, templates: Path | None = None,
                 now: dt.datetime | None = None) -> EmailMessage:
    """One plain-language notice to a member: what was wrong and how to fix it — naming the
    share (`about`, threaded under its receipt) or quoting the message that made none
    (`original`)."""
    if code not in NOTICE_CODES:
        raise ValueError(f"unknown notice code {code!r}")
    return _member_mail(settings, templates, f"notice_{code}.txt",
                        dict(to=to, details=details), to=to, about=about, original=original,
                        in_reply_to=in_reply_to, now=now)


def command_reply_email(settings: Settings, *, to: str, command: str, values: dict,
                        reply_address: str | None, in_reply_to: str | None,
                        thread_subject: str | None = None, about: ShareRef | None = None,
                        templates: Path | None = None,
                        now: dt.datetime | None = None) -> EmailMessage:
    """The answer to a member's reply command, threaded under their message. `reply_address`
    (the share's reply+key address, when known) lets them send the next command by replying;
    `thread_subject` is their message's subject, kept so mail clients group the thread."""
    values = dict(to=to, **values)
    html = (_render(settings, templates, "status.html", {**values, "about": about})
            if command == "status" and "status" in values else None)
    message = _member_mail(settings, templates, COMMAND_TEMPLATES[command], values, to=to,
                           about=about, in_reply_to=in_reply_to, reply_to=reply_address,
                           html=html, now=now, thread=False)
    if thread_subject and thread_subject.strip():
        message.replace_header("Subject", reply_subject(thread_subject))
    return message


def share_notice_email(settings: Settings, *, to: str, template: str, values: dict,
                       about: ShareRef, reply_to: str | None = None,
                       templates: Path | None = None,
                       now: dt.datetime | None = None) -> EmailMessage:
    """A notice to a member about one of their shares (a colleague acted on it, a recipient
    asks for a new link), threaded under its receipt."""
    return _member_mail(settings, templates, template, dict(to=to, **values), to=to,
                        about=about, in_reply_to=None, reply_to=reply_to, now=now)


def staff_code_email(settings: Settings, *, to: str, code: str, minutes: int,
                     templates: Path | None = None,
                     now: dt.datetime | None = None) -> EmailMessage:
    """The one-time code a member enters to set up (or reset) their console password."""
    subject, text = _render_text(settings, templates, "staff_code.txt",
                                 dict(to=to, code=code, minutes=minutes))
    return _message(settings, to=to, subject=subject, text=text, now=now)


def receipt_subject(share_title: str) -> str:
    """What receipt.txt writes as the subject (for a receipt whose outbox row is gone)."""
    title = _one_line(share_title)
    return f"Shared: {title}" if title else "Your documents were shared"


def reply_subject(subject: str) -> str:
    subject = _header_text(subject)
    return subject if subject.lower().startswith("re:") else f"Re: {subject}"


def recipient_revoked_email(settings: Settings, *, to: str, clinic_name: str, sender_name: str,
                            contact: str = "", templates: Path | None = None,
                            now: dt.datetime | None = None) -> EmailMessage:
    """Tells a recipient their access was withdrawn. No PHI, like the link e-mail: never the
    subject, the filenames or the note."""
    values = dict(to=to, clinic_name=_one_line(clinic_name), sender_name=_one_line(sender_name),
                  contact=_one_line(contact))
    subject, text = _render_text(settings, templates, "revoked_recipient.txt", values)
    return _message(settings, to=to, subject=subject, text=text, now=now,
                    from_name=f"{values['clinic_name']} via {service_name(settings)}")


def access_refused_email(settings: Settings, *, to: str, clinic_name: str, sender_name: str,
                         contact: str = "", templates: Path | None = None,
                         now: dt.datetime | None = None) -> EmailMessage:
    """Tells someone who asked for access through a forwarded link that the sender said no.
    No PHI, like the link e-mail."""
    values = dict(to=to, clinic_name=_one_line(clinic_name), sender_name=_one_line(sender_name),
                  contact=_one_line(contact))
    subject, text = _render_text(settings, templates, "access_refused.txt", values)
    return _message(settings, to=to, subject=subject, text=text, now=now,
                    from_name=f"{values['clinic_name']} via {service_name(settings)}")


def reminder_email(settings: Settings, *, to: str, link_url: str | None, clinic_name: str,
                   sender_name: str, document_count: int, sent_text: str, deadline_text: str,
                   contact: str = "", templates: Path | None = None,
                   now: dt.datetime | None = None) -> EmailMessage:
    """The one reminder before an unclaimed link expires. No PHI, like the link e-mail. Without
    `link_url` (the link could not be recovered) it points to the first e-mail instead."""
    values = dict(to=to, link_url=link_url, clinic_name=_one_line(clinic_name),
                  sender_name=_one_line(sender_name), document_count=document_count,
                  sent_text=sent_text, deadline_text=deadline_text, contact=_one_line(contact))
    subject, text = _render_text(settings, templates, "reminder.txt", values)
    html = _render(settings, templates, "reminder.html", values)
    return _message(settings, to=to, subject=subject, text=text, html=html, now=now,
                    from_name=f"{values['clinic_name']} via {service_name(settings)}")


def first_view_email(settings: Settings, *, to: str, sender_name: str, recipient: str,
                     shared_text: str, opened_text: str, in_reply_to: str | None,
                     about: ShareRef | None = None, templates: Path | None = None,
                     now: dt.datetime | None = None) -> EmailMessage:
    """Tells the sender a recipient opened the share for the first time; threaded under the
    receipt."""
    values = dict(to=to, sender_name=_one_line(sender_name), recipient=_one_line(recipient),
                  shared_text=shared_text, opened_text=opened_text)
    return _member_mail(settings, templates, "first_view.txt", values, to=to, about=about,
                        in_reply_to=in_reply_to, now=now)


def expiry_summary_email(settings: Settings, *, to: str, sender_name: str,
                         addresses: list[str], shared_text: str, in_reply_to: str | None,
                         about: ShareRef | None = None, templates: Path | None = None,
                         now: dt.datetime | None = None) -> EmailMessage:
    """One message per share: which recipients let their link lapse. Threaded under the
    receipt, so a `resend` reply is matched to the share by its references."""
    values = dict(to=to, sender_name=_one_line(sender_name), addresses=list(addresses),
                  shared_text=shared_text)
    return _member_mail(settings, templates, "expiry_summary.txt", values, to=to, about=about,
                        in_reply_to=in_reply_to, reply_to=settings.outbound.from_, now=now)


def code_email(settings: Settings, *, to: str, code: str, minutes: int,
               templates: Path | None = None, now: dt.datetime | None = None) -> EmailMessage:
    """The one-time code that proves a recipient owns this mailbox. No PHI either."""
    subject, text = _render_text(settings, templates, "code.txt",
                                 dict(to=to, code=code, minutes=minutes))
    return _message(settings, to=to, subject=subject, text=text, now=now)


def reset_email(settings: Settings, *, to: str, reset_url: str, minutes: int,
                templates: Path | None = None, now: dt.datetime | None = None) -> EmailMessage:
    """A single-use link to choose a new portal password."""
    subject, text = _render_text(settings, templates, "reset.txt",
                                 dict(to=to, reset_url=reset_url, minutes=minutes))
    return _message(settings, to=to, subject=subject, text=text, now=now)


# --- rendering -----------------------------------------------------------------------------


def _member_mail(settings: Settings, templates: Path | None, name: str, values: dict, *,
                 to: str, about: ShareRef | None, in_reply_to: str | None,
                 original: MessageRef | None = None, reply_to: str | None = None,
                 html: str | None = None, thread: bool = True,
                 now: dt.datetime | None = None) -> EmailMessage:
    """A member's notice: the share it is about named at the top (or the message that made no
    share quoted); with `thread`, filed under the share's receipt as `Re: <its subject>`."""
    subject, text = _render_text(settings, templates, name,
                                 {**values, "about": about, "original": original})
    if about is not None and thread:
        subject = reply_subject(about.receipt_subject)
        in_reply_to = about.receipt_message_id or in_reply_to
    return _message(settings, to=to, subject=subject, text=text, html=html, now=now,
                    reply_to=reply_to, in_reply_to=in_reply_to, templates=templates)


def megabytes(n: int) -> str:
    return f"{round(n / (1024 * 1024), 1):g} MB"


@functools.lru_cache(maxsize=8)
def _environment(directory: Path | None) -> jinja2.Environment:
    """The shipped templates, or those in `directory` (another set, e.g. a rebranding)."""
    loader = (jinja2.FileSystemLoader(directory) if directory is not None
              else jinja2.PackageLoader("mailbridge.templates", "email"))
    env = jinja2.Environment(
        loader=loader,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        # A missing value is a bug in the caller, not something to render as blank.
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters["megabytes"] = megabytes
    return env


def _render(settings: Settings, templates: Path | None, name: str, values: dict) -> str:
    env = _environment(Path(templates) if templates is not None else None)
    context = dict(
        service_name=service_name(settings), sharing_address=settings.addresses.sharing,
        sharing_local=settings.sharing_local, sharing_domain=settings.sharing_domain,
        base_url=settings.service.base_url, claim_hours=f"{settings.shares.claim_hours:g}")
    context.update(values)  # a clinic's own claim hours, when the caller knows them
    return env.get_template(name).render(**context)


def _render_text(settings: Settings, templates: Path | None, name: str,
                 values: dict) -> tuple[str, str]:
    """Text templates render the subject on their first line (see base.txt)."""
    subject, _, body = _render(settings, templates, name, values).partition("\n")
    return _one_line(subject), body.lstrip("\n")


def service_name(settings: Settings) -> str:
    """What our mail calls the service: the display name in `[outbound] from`, if any."""
    return settings.outbound.from_name or SERVICE_NAME


def _one_line(value: str) -> str:
    # Values from e-mail and the database end up in headers: no line breaks, no runs of space.
    return " ".join(value.split())


def _header_text(value: str) -> str:
    """`value` on one line, to be set as a header. The stdlib reads `=?...?=` in a value we
    set as an encoded-word and decodes it: text that came decoded from a member's message
    (a title, their subject) was decoded a second time, and a hostile one raised (UTF-7 into
    lone surrogates), so the share was never made. A space after the "=" keeps it text."""
    return _one_line(value).replace("=?", "= ?")


def _message(settings: Settings, *, to: str, subject: str, text: str, html: str | None = None,
             from_name: str | None = None, reply_to: str | None = None,
             in_reply_to: str | None = None, now: dt.datetime | None = None,
             templates: Path | None = None) -> EmailMessage:
    # The SMTP policy writes CRLF line ends: the bytes go to the relay unchanged.
    msg = EmailMessage(policy=SMTP)
    msg["From"] = Address(display_name=from_name or service_name(settings),
                          addr_spec=settings.outbound.from_)
    msg["To"] = to
    msg["Subject"] = _header_text(subject)
    msg["Date"] = format_datetime((now or system_clock()).replace(tzinfo=dt.UTC))
    msg["Message-ID"] = make_msgid(domain=settings.addresses.reply_domain)
    if reply_to:
        msg["Reply-To"] = reply_to
    original = _header_text(in_reply_to or "")
    if original:
        msg["In-Reply-To"] = original
        msg["References"] = original
    # RFC 3834: answers to a member's message are auto-replied, everything else generated.
    msg["Auto-Submitted"] = "auto-replied" if original else "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"  # keeps Exchange out-of-office replies away
    msg.set_content(text, cte=_transfer_encoding(text))
    if html is None:  # every e-mail has an HTML part; without a template, from the text
        html = _render(settings, templates, "generic.html", dict(body=text_to_html(text)))
    msg.add_alternative(html, subtype="html", cte=_transfer_encoding(html))
    return msg


def _transfer_encoding(body: str) -> str:
    # Plain ASCII within the 998-octet line limit goes as is, so a link stays whole in the
    # raw message; anything else is quoted-printable.
    if body.isascii() and all(len(line) <= 998 for line in body.splitlines()):
        return "7bit"
    return "quoted-printable"
