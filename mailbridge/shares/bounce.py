"""Bounces to a link e-mail's VERP address (`bounce+<id>.<mac>@<reply_domain>`): a delivery
status notification saying the link failed marks that recipient's grant and tells the sender
once. Nothing that arrives here is ever answered."""

from __future__ import annotations

import logging
from email.message import EmailMessage

from mailbridge.mail.dsn import failed_recipients, reason
from mailbridge.outbound import outbox
from mailbridge.outcomes import Done, Ignore, Outcome
from mailbridge.runtime import Runtime
from mailbridge.shares import notify
from mailbridge.shares.conclude import ignore
from mailbridge.store import inbound
from mailbridge.store.models import InboundMessage, OutboundMessage
from mailbridge.store.states import VERP_MAIL, Audit, GrantState, Inbound

log = logging.getLogger(__name__)


def handle_bounce(runtime: Runtime, row: InboundMessage, raw: bytes,
                  message: EmailMessage) -> Outcome:
    """Routed here before screening: a DSN is the very mail screening drops."""
    ids = sorted({i for a in row.envelope_to
                  if (i := outbox.verp_outbound_id(runtime, a)) is not None})
    if not ids:
        return ignore(runtime, row, Ignore("bounce address not ours (bad or missing MAC)"))
    failures = failed_recipients(message)
    if not failures:
        return ignore(runtime, row, Ignore("not a delivery failure report"))
    original = (OutboundMessage.select()
                .where(OutboundMessage.id.in_(ids) & OutboundMessage.kind.in_(VERP_MAIL)
                       & OutboundMessage.grant.is_null(False))
                .order_by(OutboundMessage.id).first())
    if original is None:
        return ignore(runtime, row, Ignore("bounce for a message that is no longer known"))
    if original.grant.state == GrantState.CLAIMED:
        # The recipient got in, so a link did arrive; a late report (say, from a forwarding
        # address) would only tell the sender something untrue.
        return ignore(runtime, row, Ignore("bounce for a link that was already claimed"))
    failure = failures[0]
    now = runtime.clock()
    with runtime.db.atomic():
        newly = notify.link_failed(
            runtime, original.grant_id, event=Audit.LINK_BOUNCED, reason=reason(failure),
            detail={"outbound_id": original.id, "inbound_id": row.id, "status": failure.status})
        summary = (f"link e-mail #{original.id} bounced" if newly
                   else f"link e-mail #{original.id} bounced; already known as undeliverable")
        inbound.conclude(row, Inbound.DONE, "bounce", summary, now)
    if newly:
        outbox.notify(runtime)
    log.info("inbound #%d: bounce for outbound #%d (status %s)%s", row.id, original.id,
             failure.status or "none", "" if newly else "; already reported")
    return Done(original.share_id, summary)
