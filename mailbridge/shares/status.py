"""What became of a share, per recipient — one reading for the `status` reply, the CLI and the
staff console: link sent and delivered, opened by a person, claimed, documents viewed and
downloaded, revoked or expired; link fetches by mail systems and refused attempts apart.

"Opened" means a person took a step that a mail scanner does not: pressing Continue (a POST),
asking for a code, entering one, signing in to claim. A GET or HEAD of the link page alone —
which mail scanners and link previews make — is shown as "link fetched by a mail system" when
the same client (IP and user agent) never took such a step.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

from mailbridge.clock import local_text
from mailbridge.runtime import Runtime
from mailbridge.store import sealed
from mailbridge.store.models import AuditEvent, Document, Grant, OutboundMessage, Share
from mailbridge.store.states import Audit, Delivery, GrantState, Mail, grant_state

# Steps only a person takes on the link's pages (all POSTs with a CSRF token).
HUMAN_STEPS = (Audit.LINK_CONTINUED, Audit.CODE_SENT, Audit.CODE_VERIFIED, Audit.CODE_FAILED,
               Audit.CLAIMED)
VIEWS = (Audit.DOCUMENT_VIEWED, Audit.DOCUMENT_DOWNLOADED)
REPORTED = (Audit.LINK_SHOWN, Audit.ACCESS_DENIED, Audit.LINK_BOUNCED, *HUMAN_STEPS, *VIEWS,
            Audit.DOCUMENTS_RETURNED)


@dataclass(frozen=True)
class RecipientStatus:
    address: str
    state: GrantState
    bounced: bool
    sent_at: dt.datetime | None
    opened_at: dt.datetime | None  # by a person
    claimed_at: dt.datetime | None
    fetches: tuple[dt.datetime, ...]  # link page fetched by clients that never took a step
    refused: tuple[dt.datetime, ...]  # someone signed in as another address tried the link
    views: int
    downloads: int
    lines: tuple[tuple[str, str], ...]  # (label, value), in the clinic's time zone


@dataclass(frozen=True)
class ShareStatus:
    share_id: int
    title: str
    sender_name: str
    created_text: str
    timezone: str
    documents: tuple[str, ...]
    recipients: tuple[RecipientStatus, ...]

    def text(self) -> str:
        """Plain "label: value" lines, readable in any font: nothing lines up by spaces."""
        title = f' "{self.title}"' if self.title else ""
        out = [f"Share{title} from {self.sender_name}, {self.created_text}",
               f"Documents: {', '.join(self.documents) or 'none'}",
               f"Times are in {self.timezone}.", ""]
        for recipient in self.recipients:
            out.append(f"{recipient.address}: {recipient.state}")
            out.extend(f"  {label}: {value}" for label, value in recipient.lines)
            out.append("")
        return "\n".join(out).rstrip("\n") + "\n"


def share_status(runtime: Runtime, share: Share) -> ShareStatus:
    now = runtime.clock()
    tz = share.clinic.timezone
    documents = list(share.documents.order_by(Document.position, Document.id))
    names = {d.id: sealed.document_name(runtime.phi_key, d) for d in documents}
    grants = list(Grant.select().where(Grant.share == share).order_by(Grant.id))
    sent = _link_sent_times(grants)
    events = _grant_events(grants)
    recipients = tuple(
        _recipient(grant, grant_state(grant.state, grant.deadline, now), tz,
                   sent.get(grant.id), events.get(grant.id, []), names)
        for grant in grants)
    return ShareStatus(share.id, sealed.share_title(runtime.phi_key, share), share.sender.name,
                       local_text(share.created_at, tz), tz, tuple(names.values()), recipients)


def _link_sent_times(grants: list[Grant]) -> dict[int, dt.datetime]:
    """The latest link e-mail handed to the relay per grant (after a resend, the new one)."""
    if not grants:
        return {}
    rows = (OutboundMessage.select(OutboundMessage.grant, OutboundMessage.sent_at)
            .where(OutboundMessage.grant.in_([g.id for g in grants])
                   & (OutboundMessage.kind == Mail.LINK) & OutboundMessage.sent_at.is_null(False))
            .order_by(OutboundMessage.sent_at))
    return {row.grant_id: row.sent_at for row in rows}


def _grant_events(grants: list[Grant]) -> dict[int, list[AuditEvent]]:
    found: dict[int, list[AuditEvent]] = defaultdict(list)
    if not grants:
        return found
    rows = (AuditEvent.select()
            .where(AuditEvent.grant.in_([g.id for g in grants])
                   & AuditEvent.kind.in_(REPORTED))
            .order_by(AuditEvent.at, AuditEvent.id))
    for event in rows:
        found[event.grant_id].append(event)
    return found


def _recipient(grant: Grant, state: GrantState, tz: str, sent_at: dt.datetime | None,
               events: list[AuditEvent], names: dict[int, str]) -> RecipientStatus:
    def at(when: dt.datetime | None, otherwise: str = "not yet") -> str:
        return local_text(when, tz) if when is not None else otherwise

    people = {(e.ip, e.user_agent) for e in events if e.kind in HUMAN_STEPS}
    opened = next((e.at for e in events if e.kind in HUMAN_STEPS), None)
    fetches = tuple(e.at for e in events
                    if e.kind == Audit.LINK_SHOWN and (e.ip, e.user_agent) not in people)
    refused = tuple(e.at for e in events if e.kind == Audit.ACCESS_DENIED
                    and (e.detail or {}).get("reason") == "wrong_account")
    bounced = grant.delivery == Delivery.FAILED
    delivered = {Delivery.SENT: "yes",
                 Delivery.FAILED: "no, the recipient's mail system refused it",
                 Delivery.QUEUED: "not yet"}.get(grant.delivery, grant.delivery)
    lines = [("link sent", at(sent_at)), ("delivered to relay", delivered),
             ("opened in a browser", at(opened))]
    if fetches:
        lines.append(("link fetched by a mail system", _times(fetches, tz)))
    lines.append(("claimed", at(grant.claimed_at)))
    seen = _by_document(events)
    for (document_id, kind), times in seen.items():
        verb = "viewed" if kind == Audit.DOCUMENT_VIEWED else "downloaded"
        lines.append((f"{verb} {names.get(document_id, 'a document')}", _times(times, tz)))
    returned = [e.at for e in events if e.kind == Audit.DOCUMENTS_RETURNED]
    if returned:
        lines.append(("sent documents back", _times(returned, tz)))
    for when in refused:
        lines.append(("refused", "someone signed in as another address tried this link at "
                      + local_text(when, tz)))
    if state == GrantState.REVOKED:
        lines.append(("revoked", at(grant.ended_at, "yes")))
    elif state == GrantState.EXPIRED:
        lines.append(("expired", at(grant.ended_at or grant.deadline, "yes")))
    elif state == GrantState.PENDING:
        lines.append(("can be claimed until", local_text(grant.deadline, tz)))
    count = {kind: sum(len(t) for (_, k), t in seen.items() if k == kind) for kind in VIEWS}
    return RecipientStatus(grant.address, state, bounced, sent_at, opened, grant.claimed_at,
                           fetches, refused, count[Audit.DOCUMENT_VIEWED],
                           count[Audit.DOCUMENT_DOWNLOADED], tuple(lines))


def _times(times: tuple[dt.datetime, ...] | list[dt.datetime], tz: str) -> str:
    if len(times) == 1:
        return local_text(times[0], tz)
    return f"{local_text(times[0], tz)}, {len(times)} times, last {local_text(times[-1], tz)}"


def _by_document(events: list[AuditEvent]) -> dict[tuple[int, str], list[dt.datetime]]:
    seen: dict[tuple[int, str], list[dt.datetime]] = {}
    for event in events:
        if event.kind in VIEWS and event.document_id:
            seen.setdefault((event.document_id, event.kind), []).append(event.at)
    return seen
