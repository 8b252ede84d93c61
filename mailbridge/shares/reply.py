"""Acting on a member's reply to a receipt or notice: find the share, check that the sender may
manage it, run the command, and answer with one threaded reply — all in one transaction."""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from dataclasses import dataclass
from email.message import EmailMessage

from mailbridge.clock import local_text
from mailbridge.mail import identity
from mailbridge.mail.command import Command, extract_command
from mailbridge.mail.route import Route, classify_address
from mailbridge.outbound import compose, outbox
from mailbridge.outcomes import Done, Notice, Outcome, Reject
from mailbridge.runtime import Runtime
from mailbridge.settings import Settings
from mailbridge.shares import access_answers, clinics, lifecycle, status
from mailbridge.shares.notices import share_ref
from mailbridge.store import audit, inbound, seen, tokens
from mailbridge.store.models import InboundMessage, Member, OutboundMessage, Share
from mailbridge.store.states import Audit, Inbound, Mail

log = logging.getLogger(__name__)

# The audit event of every reply acted on.
ANSWERED = Audit.REPLY_COMMAND
MESSAGE_ID = re.compile(r"<[^<>\s]{1,250}@[^<>\s]{1,250}>")
MAX_REFERENCES = 50


# --- which share ----------------------------------------------------------------------------


def reply_key(address: str, settings: Settings) -> str | None:
    """The key of a `reply+<key>@<reply_domain>` address, else None."""
    if classify_address(address, settings) is not Route.REPLY:
        return None
    local = address.strip().strip("<>").rpartition("@")[0].lower()
    return local[len("reply+"):] if local.startswith("reply+") else None


def share_for_key(key: str) -> Share | None:
    return Share.get_or_none(Share.reply_key_hash == tokens.hash_token(key))


def referenced_ids(message: EmailMessage, settings: Settings) -> list[str]:
    """Message-IDs in In-Reply-To and References that we could have made (ours are made with
    the reply domain), newest first."""
    suffix = "@" + settings.addresses.reply_domain.lower() + ">"
    found: list[str] = []
    for name in ("In-Reply-To", "References"):
        try:
            values = [str(v) for v in message.get_all(name) or []]
        except Exception:  # noqa: BLE001 - hostile headers can trip the stdlib's parser
            values = []
        for value in values:
            found.extend(m for m in MESSAGE_ID.findall(value) if m.lower().endswith(suffix))
    return list(dict.fromkeys(reversed(found)))[:MAX_REFERENCES]


def share_for_references(message: EmailMessage, settings: Settings) -> Share | None:
    """The share of a receipt, notice or command reply we sent to a member that this message
    answers. Messages we sent to a recipient (links, codes) do not count."""
    ids = referenced_ids(message, settings)
    if not ids:
        return None
    rows = (OutboundMessage.select()
            .where(OutboundMessage.message_id.in_(ids) & OutboundMessage.share.is_null(False)))
    for row in sorted(rows, key=lambda r: ids.index(r.message_id)):
        if row.grant_id is None or row.to_addr.lower() != row.grant.address.lower():
            return row.share
    return None


@dataclass(frozen=True)
class Thread:
    """What a reply answers: its share (None when nothing matched) and the reply+key address
    it came to (None when it was matched by its references)."""

    share: Share | None
    key: str | None


def thread_of(route: Route, envelope_to: list[str], message: EmailMessage,
              settings: Settings) -> Thread | None:
    """The one rule for "is this a reply to us?". A reply+key address decides alone; without
    one, the message must name in In-Reply-To/References something we sent a member about a
    share, whichever of our addresses it went to. Mail to our From address that names
    nothing we know is still a reply (to no share, so it is refused with a notice). None: not
    a reply, e.g. a new share."""
    keys = [k for k in (reply_key(a, settings) for a in envelope_to) if k]
    if keys:
        return Thread(share_for_key(keys[0]), keys[0])
    share = share_for_references(message, settings)
    if share is not None or route is Route.REPLY:
        return Thread(share, None)
    return None


def may_manage(member: Member, share: Share, settings: Settings) -> bool:
    if member.id == share.sender_id:
        return True
    return (settings.shares.allow_clinic_admins and member.is_admin and member.active
            and member.clinic_id == share.clinic_id)


# --- the reply -------------------------------------------------------------------------------


def handle_reply(runtime: Runtime, row: InboundMessage, message: EmailMessage,
                 member: Member, keys: list[str], thread: Thread) -> Outcome:
    """`member` is active and authenticated, and the message new (the pipeline checked all
    three); `keys` are recorded with the action, so a copy acted on at the same moment fails
    its transaction."""
    settings = runtime.settings
    share, key = thread.share, thread.key
    if share is None:
        return _refuse(runtime, row, message, member, None, Notice.REPLY_UNKNOWN,
                       "no share matches the reply", keys)
    if not may_manage(member, share, settings):
        return _refuse(runtime, row, message, member, share, Notice.REPLY_NOT_ALLOWED,
                       "the sender may not manage this share", keys)
    command = extract_command(message)
    reply_address = f"reply+{key}@{settings.addresses.reply_domain}" if key else None
    now = runtime.clock()
    with runtime.db.atomic():
        seen.remember(member, keys, row, now)
        values, event = _run(runtime, share, command, member, message)
        answer = compose.command_reply_email(
            settings, to=member.email, command=values.pop("template"), values=values,
            reply_address=reply_address, in_reply_to=identity.message_id(message),
            thread_subject=_subject(message), about=share_ref(runtime, share), now=now)
        outbox.enqueue(runtime, answer, kind=Mail.REPLY, to_addr=member.email, share=share)
        if event:
            audit.record(runtime.audit_key, event, now, actor=member.email, share=share,
                         member=member,
                         inbound=row)
        audit.record(runtime.audit_key, ANSWERED, now, actor=member.email, share=share,
                     member=member,
                     inbound=row, detail={"command": command.name,
                                          "recognised": command.recognised})
        inbound.conclude(row, Inbound.DONE, "command", f"{command.name} for share #{share.id}", now)
    outbox.notify(runtime)
    log.info("inbound #%d: %s command for share #%d answered", row.id, command.name, share.id)
    return Done(share.id, f"{command.name} command")


def _run(runtime: Runtime, share: Share, command: Command, member: Member,
         message: EmailMessage) -> tuple[dict, str | None]:
    """Carry out the command; returns the answer's template values and an extra audit kind
    (the lifecycle functions audit their own changes)."""
    claim_hours = clinics.policy(share.clinic, runtime.settings).claim_hours
    values = dict(sender_name=member.name, claim_hours=f"{claim_hours:g}")
    actor = member.email
    if command.name == "status":
        report = status.share_status(runtime, share)
        return {**values, "template": "status", "report": report.text(),
                "status": report}, Audit.STATUS_SENT
    if command.name in ("revoke", "resend"):
        operation = lifecycle.revoke if command.name == "revoke" else lifecycle.resend
        result = operation(runtime, share, address=command.argument or None, actor=actor)
        return {**values, **_result_values(result), "template": command.name}, None
    if command.name == "extend":
        hours = _hours(command.argument)
        if command.argument and hours is None:
            result = lifecycle.Result(f'"{command.argument}" is not a number of hours above '
                                      "0; nothing was changed. Write for example: extend 48")
        else:  # no number: the lifecycle default, `claim_hours`
            result = lifecycle.extend(runtime, share, hours=hours, actor=actor)
        return {**values, **_result_values(result), "template": "extend"}, None
    if command.name in access_answers.DECISIONS:
        return {**values, **_result_values(_answer_request(runtime, share, command, member,
                                                           message)),
                "template": command.name}, None
    return {**values, "template": "help", "recognised": command.recognised}, Audit.HELP_SENT


def _answer_request(runtime: Runtime, share: Share, command: Command, member: Member,
                    message: EmailMessage) -> lifecycle.Result:
    """`approve` / `deny` [address]: the request the reply answers (see access_answers)."""
    found = access_answers.for_reply(share, command.argument,
                                     referenced_ids(message, runtime.settings), runtime.clock())
    if isinstance(found, lifecycle.Result):
        return found
    return access_answers.decide(runtime, found, command.name, member, via="reply")


def _result_values(result: lifecycle.Result) -> dict:
    return {"summary": result.summary, "lines": list(result.lines),
            "changed": list(result.changed)}


def _hours(argument: str) -> float | None:
    """The number `command.parse_command` left in the argument, or None if there is none."""
    try:
        value = float(argument)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def original_of(message: EmailMessage, timezone: str) -> compose.MessageRef:
    """The member's message as a notice quotes it: its subject and its Date (in `timezone`;
    as written when it cannot be read)."""
    date = ""
    try:
        value = message.get("Date")
        when = getattr(value, "datetime", None) if value is not None else None
        if when is not None and when.tzinfo is not None:
            date = local_text(when.astimezone(dt.UTC).replace(tzinfo=None), timezone)
        elif value is not None:
            date = " ".join(str(value).split())
    except Exception:  # noqa: BLE001 - hostile headers can trip the stdlib's parser
        date = ""
    return compose.MessageRef(subject=_subject(message) or "", date_text=date or "unknown")


def _subject(message: EmailMessage) -> str | None:
    try:
        value = message.get("Subject")
    except Exception:  # noqa: BLE001
        return None
    return str(value) if value else None


def _refuse(runtime: Runtime, row: InboundMessage, message: EmailMessage, member: Member,
            share: Share | None, code: str, reason: str, keys: list[str]) -> Reject:
    """Nothing changes; the authenticated member is told why, once."""
    settings = runtime.settings
    now = runtime.clock()
    notice = compose.notice_email(settings, to=member.email, code=code,
                                  details={"admins": settings.shares.allow_clinic_admins},
                                  in_reply_to=identity.message_id(message),
                                  original=original_of(message, share.clinic.timezone
                                                       if share else "UTC"), now=now)
    with runtime.db.atomic():
        seen.remember(member, keys, row, now)
        outbox.enqueue(runtime, notice, kind=Mail.NOTICE, to_addr=member.email)
        audit.record(runtime.audit_key, Audit.REPLY_REFUSED, now, actor=member.email,
                     member=member, share=share,
                     inbound=row, detail={"reason": code})
        inbound.conclude(row, Inbound.REJECTED, code, reason, now)
    outbox.notify(runtime)
    log.info("inbound #%d: reply refused (%s); notice queued for the member", row.id, code)
    return Reject(code, reason)
