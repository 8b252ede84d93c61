"""Someone a link was forwarded to asks for access for their own address: a one-time code
proves that address (the claim code's rules), then the share's sender is e-mailed the request.
The sender's answer is in `access_answers`."""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from dataclasses import dataclass

from mailbridge.clock import local_text
from mailbridge.mail.addresses import normalise
from mailbridge.outbound import compose, outbox
from mailbridge.runtime import Runtime
from mailbridge.shares import clinics
from mailbridge.shares.notices import share_ref
from mailbridge.store import audit, tokens
from mailbridge.store.models import AccessRequest, Grant
from mailbridge.store.states import LIVE, AccessState, Audit, Mail, grant_state

# The claim code's rules (web/links.py): 6 digits, 10 minutes, 5 tries, once, the newest only.
CODE_DIGITS = 6
CODE_MINUTES = 10
CODE_MAX_ATTEMPTS = 5
# Codes per link and per address in a window, as for claiming: a link holder cannot turn us
# into a mail cannon aimed at one mailbox, nor mail many mailboxes through one link.
CODES_PER_WINDOW, CODE_WINDOW = 3, dt.timedelta(minutes=15)
# Requests waiting for the sender, per link: more are refused until some are answered or lapse.
OPEN_PER_LINK = 5
MAX_NAME = 100

BAD_ADDRESS = "Enter one e-mail address, such as name@example.com."
OWN_LINK = ("This link was sent to that address. Go back to the link and press Continue to "
            "open it.")
CODE_LIMIT = ("We just sent a code. Check your inbox (and spam folder), or wait a few minutes "
              "before asking for another.")
TOO_MANY_OPEN = ("Several requests made with this link are already waiting for an answer. "
                 "Please wait for the person who shared it to answer them.")
WRONG_CODE = "That code is not right. Check the e-mail and try again."
DEAD_CODE = "That code can no longer be used. Please ask for a new code."
MALFORMED_CODE = f"Enter the {CODE_DIGITS} digits from the e-mail."


@dataclass(frozen=True)
class Refused:
    """Why nothing was sent, for the page, and the HTTP status to show it with."""

    message: str
    status: int = 400


@dataclass(frozen=True)
class Submitted:
    """The code was right. `already` says the requester asked before or has access already,
    so the sender was not asked again."""

    request: AccessRequest
    already: str = ""


def state_of(request: AccessRequest, now: dt.datetime) -> AccessState:
    """An open request past `expires_at` is expired whether or not anything marked it."""
    if request.state == AccessState.OPEN and request.expires_at <= now:
        return AccessState.EXPIRED
    return AccessState(request.state)


def requestable(grant: Grant, now: dt.datetime) -> bool:
    """Access may be asked for through a live link (pending or claimed) of a share whose
    documents are still there; an expired or revoked link proves nothing any more."""
    return (grant_state(grant.state, grant.deadline, now) in LIVE
            and grant.share.purged_at is None)


def send_code(runtime: Runtime, grant: Grant, address_text: str, name: str, *, ip: str,
              user_agent: str) -> AccessRequest | Refused:
    """Start a request through `grant`'s link: e-mail a code to the address given. The code
    mail carries no PHI (the shared code template)."""
    text = address_text.strip()
    # One bare address, as typed in the form: no display names, lists or line breaks.
    plain = bool(text) and len(text) <= 320 and not any(
        ch.isspace() or ch in ',;<>"()' for ch in text)
    address = normalise(text) if plain else None
    if address is None:
        return Refused(BAD_ADDRESS)
    if address == grant.address.lower():
        return Refused(OWN_LINK)
    now = runtime.clock()
    since = now - CODE_WINDOW
    recent = AccessRequest.created_at > since
    if (AccessRequest.select().where((AccessRequest.origin == grant) & recent).count()
            >= CODES_PER_WINDOW
            or AccessRequest.select().where((AccessRequest.address == address) & recent).count()
            >= CODES_PER_WINDOW):
        return Refused(CODE_LIMIT, 429)
    waiting = (AccessRequest.select().where((AccessRequest.origin == grant)
                                            & (AccessRequest.state == AccessState.OPEN)
                                            & (AccessRequest.expires_at > now)).count())
    if waiting >= OPEN_PER_LINK:
        return Refused(TOO_MANY_OPEN, 429)
    code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
    message = compose.code_email(runtime.settings, to=address, code=code, minutes=CODE_MINUTES,
                                 now=now)
    with runtime.db.atomic():
        # Only the newest code for this link and address counts.
        (AccessRequest.update(code_expires_at=now)
         .where((AccessRequest.origin == grant) & (AccessRequest.address == address)
                & (AccessRequest.state == AccessState.UNVERIFIED)
                & (AccessRequest.code_expires_at > now)).execute())
        row = AccessRequest.create(
            share=grant.share_id, origin=grant, address=address, name=_one_line(name),
            state=AccessState.UNVERIFIED, created_at=now, code_hash="", ip=ip,
            code_expires_at=now + dt.timedelta(minutes=CODE_MINUTES))
        row.code_hash = _code_hash(row.id, code)
        AccessRequest.update(code_hash=row.code_hash).where(AccessRequest.id == row.id).execute()
        audit.record(runtime.audit_key, Audit.ACCESS_CODE_SENT, now, actor=address,
                     share=grant.share_id, grant=grant, ip=ip, user_agent=user_agent,
                     detail={"access_request": row.id})
        # Neither share nor grant on the row: it is not mail to the member, nor the link's.
        outbox.enqueue(runtime, message, kind=Mail.ACCESS_CODE, to_addr=address)
    outbox.notify(runtime)
    return row


def verify(runtime: Runtime, request_id: int, grant: Grant, entered: str, *, ip: str,
           user_agent: str) -> Submitted | Refused:
    """The code for request `request_id` (which must be `grant`'s): right, the request is
    open and the sender is e-mailed; wrong, a try is used."""
    entered = "".join(entered.split())
    if len(entered) != CODE_DIGITS or not entered.isascii() or not entered.isdigit():
        return Refused(MALFORMED_CODE)  # cannot be right; not counted as a guess
    now = runtime.clock()
    row = AccessRequest.get_or_none((AccessRequest.id == request_id)
                                    & (AccessRequest.origin == grant))
    live = ((AccessRequest.id == request_id) & (AccessRequest.state == AccessState.UNVERIFIED)
            & (AccessRequest.code_expires_at > now))
    # Take the try before comparing, so parallel guesses cannot exceed the allowance.
    taken = (AccessRequest.update(code_attempts=AccessRequest.code_attempts + 1)
             .where(live & (AccessRequest.code_attempts < CODE_MAX_ATTEMPTS))
             .execute()) if row is not None else 0
    if not taken:
        return Refused(DEAD_CODE)
    if not hmac.compare_digest(row.code_hash, _code_hash(row.id, entered)):
        attempts = AccessRequest.get_by_id(row.id).code_attempts
        with runtime.db.atomic():
            audit.record(runtime.audit_key, Audit.ACCESS_CODE_FAILED, now, actor=row.address,
                         share=row.share_id, grant=grant, ip=ip, user_agent=user_agent,
                         detail={"access_request": row.id, "attempts": attempts})
        return Refused(DEAD_CODE if attempts >= CODE_MAX_ATTEMPTS else WRONG_CODE)
    return _submit(runtime, row, grant, live, now, ip=ip, user_agent=user_agent)


def _submit(runtime: Runtime, row: AccessRequest, grant: Grant, live, now: dt.datetime, *,
            ip: str, user_agent: str) -> Submitted | Refused:
    share = grant.share
    already = _already(row, now)
    hours = runtime.settings.shares.access_request_hours
    with runtime.db.atomic():
        # Conditional: of two submissions of the same code only one goes on.
        if already:
            used = AccessRequest.update(code_expires_at=now).where(live).execute()
            return Submitted(row, already) if used else Refused(DEAD_CODE)
        expires = now + dt.timedelta(hours=hours)
        used = (AccessRequest.update(state=AccessState.OPEN, requested_at=now, expires_at=expires)
                .where(live).execute())
        if not used:
            return Refused(DEAD_CODE)
        row = AccessRequest.get_by_id(row.id)
        sender = share.sender
        tz = share.clinic.timezone
        claim_hours = clinics.policy(share.clinic, runtime.settings).claim_hours
        message = compose.share_notice_email(
            runtime.settings, to=sender.email, template="access_request.txt",
            values=dict(sender_name=sender.name, requester=row.address,
                        requester_name=row.name, original_address=grant.address,
                        asked_text=local_text(now, tz), expires_text=local_text(expires, tz),
                        claim_hours=f"{claim_hours:g}"),
            about=share_ref(runtime, share), reply_to=runtime.settings.outbound.from_, now=now)
        queued = outbox.enqueue(runtime, message, kind=Mail.ACCESS_REQUEST, to_addr=sender.email,
                                share=share)
        (AccessRequest.update(notice_message_id=queued.message_id)
         .where(AccessRequest.id == row.id).execute())
        audit.record(runtime.audit_key, Audit.ACCESS_REQUESTED, now, actor=row.address,
                     share=share, grant=grant, ip=ip, user_agent=user_agent,
                     detail={"access_request": row.id, "address": row.address,
                             "origin_grant": grant.id})
    outbox.notify(runtime)
    return Submitted(AccessRequest.get_by_id(row.id))


def _already(row: AccessRequest, now: dt.datetime) -> str:
    """Why the sender need not be asked (said only to someone who proved the address)."""
    grants = Grant.select().where((Grant.share == row.share_id) & (Grant.address == row.address))
    if any(grant_state(g.state, g.deadline, now) in LIVE for g in grants):
        return ("Your address already has access to these documents. Open the link that was "
                "sent to it, or sign in to your library.")
    waiting = (AccessRequest.select().where((AccessRequest.share == row.share_id)
                                            & (AccessRequest.address == row.address)
                                            & (AccessRequest.state == AccessState.OPEN)
                                            & (AccessRequest.expires_at > now)).exists())
    if waiting:
        return "You asked already. The answer will come by e-mail to your address."
    return ""


def purge_unverified(cutoff: dt.datetime) -> int:
    """Delete requests whose code was never entered and died before `cutoff` (the purge job,
    `[retention] code_days`): nothing but a dead code hash. Asked requests are records."""
    return (AccessRequest.delete()
            .where((AccessRequest.state == AccessState.UNVERIFIED)
                   & (AccessRequest.code_expires_at < cutoff)).execute())


def _code_hash(request_id: int, code: str) -> str:
    # Bound to the request: a code sent for one request proves nothing for another.
    return tokens.hash_token(f"access:{request_id}:{code}")


def _one_line(text: str) -> str:
    # Line breaks and invisible characters become spaces: the name is one line in the mail.
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())[:MAX_NAME]
