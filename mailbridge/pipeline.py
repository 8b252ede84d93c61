"""THE page to read: what happens to one spooled message, step by step.

Each step is a small function that either hands data to the next step or ends the message
with a typed outcome: `Ignore`, `Reject`, `Done`, or `TempFail` (the worker retries later).
A database or storage outage surfaces as an exception: the worker makes the message wait
without counting the attempt. The final step records the outcome together with whatever it
created, in one transaction.
"""

from __future__ import annotations

from mailbridge.mail import identity, mime, request, screen, senders
from mailbridge.mail.route import Route, route_message
from mailbridge.outcomes import Ignore, Outcome, Reject, TempFail
from mailbridge.runtime import Runtime
from mailbridge.shares import bounce, create, members, reply
from mailbridge.shares.conclude import ignore, record_forgery, reject, repeat
from mailbridge.store import seen
from mailbridge.store.models import InboundMessage


def process(runtime: Runtime, row: InboundMessage, raw: bytes) -> Outcome:
    settings = runtime.settings
    message = mime.read_message(raw)

    # 1. Route: which of our addresses was this for?
    route = route_message(row.envelope_to, settings)
    if route is Route.BOUNCE:
        # A delivery report to a VERP address is exactly what screening drops (null sender,
        # multipart/report): it is read here, before screening, and never answered.
        return bounce.handle_bounce(runtime, row, raw, message)
    if route is None:
        return ignore(runtime, row, Ignore("not addressed to a mailbridge address"))
    # A reply answers a receipt or notice of ours, whichever of our addresses it went to.
    thread = reply.thread_of(route, row.envelope_to, message, settings)

    # 2. Screen: auto-replies, bounces, lists and our own mail never act and never get a reply.
    # IMAP intake has no SMTP envelope (its rows store ""): screening then reads Return-Path.
    envelope_from = None if row.channel == "imap" else row.envelope_from
    screened = screen.screen(message, envelope_from, settings)
    if screened:
        return ignore(runtime, row, screened)

    # 3. Identify the sender: an active member whose mail is authenticated (DKIM / trusted AR).
    member = members.find_active(senders.from_address(message))
    if member is None:
        return ignore(runtime, row, Ignore("sender is not an active member"))
    trusted = senders.headers_trusted(row.channel, row.client_ip, settings)
    auth = senders.authenticate(raw, message, settings, dnsfunc=runtime.dnsfunc,
                                trust_headers=trusted)
    if auth.forged:  # recorded whatever the outcome: someone tried to pass as our MTA
        record_forgery(runtime, row, member, auth.forged)
    if not auth.ok and auth.temporary:  # DNS timed out: the worker retries later
        return TempFail(f"sender authentication incomplete: {auth.reason}")
    if not auth.ok:
        return ignore(runtime, row, Ignore(f"sender not authenticated: {auth.reason}"),
                      member=member)

    # 4. Once only: a message acted on before (an SMTP retry, or a replay of a signed message
    # with its whitespace changed) does nothing and gets no answer. The keys are written with
    # the action below, under a unique index.
    keys = identity.message_keys(raw, message)
    if seen.seen(member, keys):
        return repeat(runtime, row, member)

    # 5a. A reply: sender checks, the command and its answer, in one transaction.
    if thread is not None:
        return reply.handle_reply(runtime, row, message, member, keys, thread)

    # 5b. Read what the member asked for: recipients, title, note, documents.
    wanted = request.parse_share(message, row.envelope_to, settings)
    if isinstance(wanted, Reject):
        return reject(runtime, row, wanted, member, message, keys)

    # 6. Act: one share, its documents, grants, audit events and e-mails — all or nothing.
    return create.create_share(runtime, row, raw, member, message, wanted, keys)
