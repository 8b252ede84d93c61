"""Every entry point that reads untrusted mail, run on one raw message, and the promise they
all keep: each returns a value or a typed outcome, never raises, and hands on only text that
can be stored and mailed (UTF-8, no lone surrogates). Shared by `scripts/fuzz`, the replay of
`tests/fixtures/fuzz/` and the Hypothesis property test, so all three check the same thing.
"""

from __future__ import annotations

import base64
import email.message
import functools
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailbridge.config import load_settings
from mailbridge.mail import (
    attachments,
    authresults,
    command,
    dsn,
    filetypes,
    identity,
    mime,
    note,
    recipients,
    request,
    screen,
    senders,
    text,
)
from mailbridge.outbound import compose
from mailbridge.outcomes import Ignore, Notice, Reject
from mailbridge.settings import Settings
from mailbridge.shares import reply

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CRASHES = FIXTURES / "fuzz"
SHARE = "share@portal.example"
PLUS = "share+dr.smith=ortho.example@portal.example"
MEMBER = "jane@riverside-pt.example"
TRUSTED_ID = "mx.portal.example"
# The corpus keeps notes beside its messages; they are not mail.
NOT_MAIL = frozenset({"MANIFEST.tsv", "SOURCES.tsv", "README.md"})


class Broken(Exception):
    """An entry point raised or broke its promise; `entry` names it."""

    def __init__(self, entry: str, problem: BaseException | str) -> None:
        self.entry = entry
        self.problem = problem
        super().__init__(f"{entry}: {describe(problem)}")

    def signature(self) -> str:
        """What makes two crashes the same bug: entry point, error type, where it was raised."""
        if isinstance(self.problem, str):
            return f"{self.entry}|{self.problem.split(':', 1)[0]}"
        frames = traceback.extract_tb(self.problem.__traceback__)
        place = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return f"{self.entry}|{type(self.problem).__name__}|{place}"


def describe(problem: BaseException | str) -> str:
    if isinstance(problem, str):
        return problem
    return f"{type(problem).__name__}: {str(problem)[:200]}"


@functools.cache
def fuzz_settings() -> Settings:
    """Settings as a clinic would run them: authentication required, one trusted MTA id."""
    return load_settings(None, env={
        "MAILBRIDGE_SERVICE_BASE_URL": "http://portal.example",
        "MAILBRIDGE_SERVICE_DATA_DIR": tempfile.gettempdir(),
        "MAILBRIDGE_ADDRESSES_SHARING": SHARE,
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
        "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
        "MAILBRIDGE_SENDERS_TRUSTED_AUTHSERV_IDS": TRUSTED_ID,
    })


@functools.cache
def _dkim_record() -> bytes:
    # One real public key answers every lookup, so signature checks run to the end.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def stub_dns(name, timeout=5) -> bytes:
    """No network while fuzzing: every DKIM key lookup gets the same record."""
    return _dkim_record()


# --- the promise: values that can be stored and mailed ----------------------------------------


def storable(entry: str, value: object, what: str) -> None:
    """Text handed on is stored (sealed as UTF-8), logged or mailed: it must encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Broken(entry, f"unstorable {what}: {describe(exc)}") from None
    elif isinstance(value, list | tuple):
        for item in value:
            storable(entry, item, what)
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(entry, item, f"{what}[{key}]")


def expect(entry: str, value: object, kinds: tuple[type, ...]) -> None:
    if not isinstance(value, kinds):
        raise Broken(entry, f"wrong result: {type(value).__name__}")


def _reject_ok(entry: str, value: Reject) -> None:
    expect(entry, value.code, (Notice,))
    storable(entry, value.reason, "reason")
    storable(entry, value.details, "details")


# --- the entry points, in the order the pipeline meets them -----------------------------------


@dataclass(frozen=True)
class Mail:
    raw: bytes
    message: email.message.EmailMessage
    settings: Settings


def share_request(mail: Mail) -> None:
    """The request as the pipeline reads it; where it stops at a Reject, the parts it did not
    reach are read one by one (with a plus-address, recipients are always found)."""
    found = recipients.find_recipients(mail.message, [SHARE], mail.settings)
    expect("share_request", found, (list, Reject))
    result = request.parse_share(mail.message, [PLUS], mail.settings)
    expect("share_request", result, (request.ParsedShare, Reject))
    if isinstance(result, request.ParsedShare):
        _share_ok(result)
        _receipt_written(mail, result)
        return
    _reject_ok("share_request", result)
    _member_hears(mail, result)
    if isinstance(found, Reject):
        _reject_ok("share_request", found)
    documents = attachments.find_attachments(mail.message, mail.settings.limits)
    expect("share_request", documents, (list, Reject))
    if isinstance(documents, Reject):
        _reject_ok("share_request", documents)
    storable("share_request", note.sender_note(mail.message), "note")
    storable("share_request", request.message_title(mail.message), "title")
    storable("share_request", text.body_lines(mail.message), "body line")


def _member_hears(mail: Mail, result: Reject) -> None:
    """The notice the member gets for a Reject, composed and written out as conclude.reject
    and the outbox do: a Reject nobody can send is a member who never hears why."""
    notice = compose.notice_email(mail.settings, to=MEMBER, code=result.code,
                                  details=result.details,
                                  in_reply_to=identity.message_id(mail.message),
                                  original=reply.original_of(mail.message, "America/New_York"))
    notice.as_bytes()


def _receipt_written(mail: Mail, result: request.ParsedShare) -> None:
    """The receipt create_share sends: the title and the Message-ID end up in its headers."""
    compose.receipt_email(
        mail.settings, to=MEMBER, sender_name="Jane Doe", share_title=result.title,
        recipients=result.recipients, filenames=[a.filename for a in result.attachments],
        deadline_text="Sunday", reply_address="reply+key@reply.portal.example",
        in_reply_to=identity.message_id(mail.message)).as_bytes()


def _share_ok(result: request.ParsedShare) -> None:
    if not result.recipients or not result.attachments:
        raise Broken("share_request", "a share without recipients or documents")
    if len(result.title) > request.MAX_TITLE_CHARS:
        raise Broken("share_request", "title too long")
    storable("share_request", [result.title, result.note_html, *result.recipients], "share")
    for document in result.attachments:
        storable("share_request", document.filename, "filename")
        if len(document.filename) > filetypes.MAX_NAME_CHARS or "/" in document.filename:
            raise Broken("share_request", "unsafe filename")


def mime_parts(mail: Mail) -> None:
    """Every part as attachments.py reads it: name, text, payload, type and safe name."""
    stack: list[email.message.Message] = [mail.message]
    seen = 0
    while stack and seen < 200:
        part = stack.pop()
        seen += 1
        stack.extend(mime.children(part))
        storable("mime_parts", [mime.header_text(part, h) for h in ("Subject", "Content-ID")],
                 "header")
        name = mime.part_filename(part)
        storable("mime_parts", [name, mime.part_text(part)], "part")
        data = mime.payload(part)
        expect("mime_parts", data, (bytes, type(None)))
        kind = filetypes.detect_kind(data or b"")
        safe = filetypes.sanitise_filename(name, kind, seen)
        if not safe:
            raise Broken("mime_parts", "empty safe filename")
        storable("mime_parts", safe, "safe filename")


def screening(mail: Mail) -> None:
    for envelope_from in (None, MEMBER):
        result = screen.screen(mail.message, envelope_from, mail.settings)
        expect("screening", result, (Ignore, type(None)))


def sender(mail: Mail) -> None:
    found = senders.from_address(mail.message)
    expect("sender", found, (str, type(None)))
    storable("sender", found, "from")
    domain = found.rpartition("@")[2] if found else "riverside-pt.example"
    for trust in (True, False):
        verdict = authresults.judge(mail.message, domain, [TRUSTED_ID], trust=trust)
        expect("sender", verdict, (authresults.Verdict,))
        result = senders.authenticate(mail.raw, mail.message, mail.settings,
                                      dnsfunc=stub_dns, trust_headers=trust)
        expect("sender", result, (senders.AuthResult,))
        storable("sender", [verdict.reason, result.reason], "reason")


def once_only(mail: Mail) -> None:
    keys = identity.message_keys(mail.raw, mail.message)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise Broken("once_only", "no message keys")
    expect("once_only", identity.share_dedupe_key(mail.raw, mail.message), (str,))


def answer_headers(mail: Mail) -> None:
    """What an answer to the member takes from their message: the Message-ID it quotes, the
    subject and date a notice shows, the references that find a reply's share."""
    found = identity.message_id(mail.message)
    expect("answer_headers", found, (str, type(None)))
    original = reply.original_of(mail.message, "America/New_York")
    references = reply.referenced_ids(mail.message, mail.settings)
    storable("answer_headers", [found, original.subject, original.date_text, *references],
             "header")


def reply_command(mail: Mail) -> None:
    line = command.first_unquoted_line(mail.message)
    expect("reply_command", line, (str, type(None)))
    found = command.parse_command(line)
    expect("reply_command", found, (command.Command,))
    storable("reply_command", [line, found.argument], "command")
    # The answer keeps the member's subject (Re: ...), so mail clients group the thread.
    compose.command_reply_email(
        mail.settings, to=MEMBER, command="help",
        values={"recognised": found.recognised, "sender_name": "Jane Doe", "claim_hours": "24"},
        reply_address=None, in_reply_to=identity.message_id(mail.message),
        thread_subject=reply.original_of(mail.message, "UTC").subject).as_bytes()


def delivery_report(mail: Mail) -> None:
    failures = dsn.failed_recipients(mail.message)
    expect("delivery_report", failures, (list,))
    for failure in failures:
        storable("delivery_report", [failure.recipient, failure.status, dsn.reason(failure)],
                 "failure")


ENTRY_POINTS: tuple[Callable[[Mail], None], ...] = (
    delivery_report, screening, sender, once_only, answer_headers, reply_command, share_request,
    mime_parts)


def check(raw: bytes, settings: Settings | None = None) -> None:
    """Run `raw` through every entry point; raise Broken at the first broken promise."""
    try:
        message = mime.read_message(raw)
    except Exception as exc:  # noqa: BLE001 - that is the finding
        raise Broken("read_message", exc) from exc
    expect("read_message", message, (email.message.EmailMessage,))
    mail = Mail(raw, message, settings or fuzz_settings())
    for entry in ENTRY_POINTS:
        try:
            entry(mail)
        except Broken:
            raise
        except RecursionError as exc:
            raise Broken(entry.__name__, exc) from None  # its traceback is too long to keep
        except Exception as exc:  # noqa: BLE001 - that is the finding
            raise Broken(entry.__name__, exc) from exc


# --- the messages to start from -----------------------------------------------------------------


def seed_files(corpus: Path | None) -> list[Path]:
    """The mail fixtures, the crashes kept so far, and the shared corpus when it is there."""
    found = sorted((FIXTURES / "mail").glob("*.eml")) + sorted(CRASHES.glob("*.eml"))
    if corpus is not None and corpus.is_dir():
        found += sorted(p for p in corpus.rglob("*") if p.is_file() and p.name not in NOT_MAIL)
    return found
