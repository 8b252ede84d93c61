"""THE page to read: what happens to one spooled message, step by step.

Each step is a small function that either hands data to the next step or ends the message
with a typed outcome: `Ignore`, `Reject`, `Done`, or `TempFail` (the worker retries later).
A database or storage outage surfaces as an exception: the worker makes the message wait
without counting the attempt. The final step records the outcome together with whatever it
created, in one transaction.
"""

from __future__ import annotations

from mailbridge import members, parse, replay, screen, senders
from mailbridge.actions import bounces, commands, share
from mailbridge.models import InboundMessage
from mailbridge.outcomes import Ignore, Outcome, Reject, TempFail
from mailbridge.respond import ignore, record_forgery, reject, repeat
from mailbridge.route import Route, route_message
from mailbridge.runtime import Runtime


def process(runtime: Runtime, row: InboundMessage, raw: bytes) -> Outcome:
    settings = runtime.settings
    message = parse.read_message(raw)

    # 1. Route: which of our addresses was this for?
    route = route_message(row.envelope_to, settings)
    if route is Route.BOUNCE:
        # A delivery report to a VERP address is exactly what screening drops (null sender,
        # multipart/report): it is read here, before screening, and never answered.
        return bounces.handle_bounce(runtime, row, raw, message)
    if route is None:
        return ignore(runtime, row, Ignore("not addressed to a mailbridge address"))
    # Mail to the sharing address that answers a receipt or notice of ours is a reply.
    if route is Route.SHARE and commands.answers_us(message, settings):
        route = Route.REPLY

    # 2. Screen: auto-replies, bounces, lists and our own mail never act and never get a reply.
    # IMAP intake has no SMTP envelope (its rows store ""): screening then reads Return-Path.
    envelope_from = None if row.channel == "imap" else row.envelope_from
    screened = screen.screen(message, envelope_from, row.envelope_to, settings)
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
    keys = replay.message_keys(raw, message)
    if replay.seen(member, keys):
        return repeat(runtime, row, member)

    # 5a. A reply: sender checks, the command and its answer, in one transaction.
    if route is Route.REPLY:
        return commands.handle_reply(runtime, row, message, member, keys)

    # 5b. Read what the member asked for: recipients, title, note, documents.
    request = parse.parse_share(message, row.envelope_to, settings)
    if isinstance(request, Reject):
        return reject(runtime, row, request, member, message, keys)

    # 6. Act: one share, its documents, grants, audit events and e-mails — all or nothing.
    return share.create_share(runtime, row, raw, member, message, request, keys)
