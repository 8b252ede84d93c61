"""The audit trail as people and auditors read it: each event with its time in the clinic's
zone and in UTC, what happened, who did it, the share, the recipient, the document (its name
opened from the sealed store), and where the request came from. Read a page at a time, so an
export of a million events runs in constant memory."""

from __future__ import annotations

import collections
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass

import peewee

from mailbridge.clock import local_text
from mailbridge.runtime import Runtime
from mailbridge.store import audit, sealed
from mailbridge.store.models import (
    AuditEvent,
    Clinic,
    Document,
    Grant,
    Member,
    SentBack,
    Share,
)

PAGE = 2000
FIELDS = ("seq", "time_local", "time_utc", "kind", "actor", "share", "recipient", "document",
          "ip", "user_agent", "clinic", "detail", "mac")


@dataclass(frozen=True)
class Selection:
    """Which events: all of them, or those of one share, one clinic, one recipient (events
    of their grants, or done by them), one actor, or a time range (UTC)."""

    share_id: int | None = None
    clinic: Clinic | None = None
    recipient: str | None = None
    actor: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


def count(selection: Selection) -> int:
    return query(selection).count()


def rows(runtime: Runtime, selection: Selection) -> Iterator[dict]:
    """The selected events in chain order, each as a dict of FIELDS. Events are read as plain
    tuples a page at a time, and the rows they refer to are looked up once per page and
    remembered (up to a bound), so memory stays flat however long the trail."""
    names = _Names(runtime)
    last = 0
    while True:
        page_query = (query(selection).select(*COLUMNS).where(AuditEvent.seq > last)
                 .order_by(AuditEvent.seq).limit(PAGE))
        # The database's own rows, converted here: peewee's per-field conversion was most of
        # the time an export took.
        page = [_Event(*row) for row in runtime.db.execute(page_query).fetchall()]
        if not page:
            return
        names.load(page)
        for event in page:
            yield names.row(event)
        last = page[-1].seq


def query(selection: Selection) -> peewee.Select:
    """The selected events (unordered): for a count, a page, or a newest-first list."""
    events = AuditEvent.select()
    if selection.share_id is not None:
        # Documents sent back on the share are a share of their own (send_back.py): their
        # events belong to the exchange on this one.
        shares = Share.select(Share.id).where(
            (Share.id == selection.share_id)
            | Share.id.in_(SentBack.select(SentBack.share)
                           .where(SentBack.original == selection.share_id)))
        grants = Grant.select(Grant.id).where(Grant.share.in_(shares))
        events = events.where(AuditEvent.share.in_(shares) | AuditEvent.grant.in_(grants))
    if selection.clinic is not None:
        shares = Share.select(Share.id).where(Share.clinic == selection.clinic)
        members = Member.select(Member.id).where(Member.clinic == selection.clinic)
        grants = Grant.select(Grant.id).where(Grant.share.in_(shares))
        events = events.where(AuditEvent.share.in_(shares) | AuditEvent.member.in_(members)
                              | AuditEvent.grant.in_(grants)
                              | (AuditEvent.clinic == selection.clinic))
    if selection.recipient:
        grants = Grant.select(Grant.id).where(Grant.address == selection.recipient)
        events = events.where(AuditEvent.grant.in_(grants)
                              | (AuditEvent.actor == selection.recipient))
    if selection.actor:
        events = events.where(AuditEvent.actor == selection.actor)
    if selection.since is not None:
        events = events.where(AuditEvent.at >= selection.since)
    if selection.until is not None:
        events = events.where(AuditEvent.at < selection.until)
    return events


COLUMNS = (AuditEvent.seq, AuditEvent.at, AuditEvent.kind, AuditEvent.actor,
           AuditEvent.share, AuditEvent.grant, AuditEvent.document, AuditEvent.member,
           AuditEvent.clinic, AuditEvent.ip, AuditEvent.user_agent, AuditEvent.detail,
           AuditEvent.mac)
_Event = collections.namedtuple("_Event", [c.name for c in COLUMNS])
REMEMBERED = 50_000  # rows remembered per kind before starting afresh


class _Names:
    """What events refer to — a grant's address and share, a share's or member's clinic, a
    clinic's name and zone, a document's (sealed) name — read in bulk, remembered."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.fallback_zone = runtime.settings.service.timezone
        self.grants: dict[int, tuple[str, int]] = {}
        self.shares: dict[int, int] = {}
        self.members: dict[int, int] = {}
        self.clinics: dict[int, tuple[str, str]] = {}
        self.documents: dict[int, str] = {}

    def load(self, page: list) -> None:
        self._fill(self.grants, {e.grant for e in page},
                   lambda ids: ((g.id, (g.address, g.share_id)) for g in
                                Grant.select(Grant.id, Grant.address, Grant.share)
                                .where(Grant.id.in_(ids))))
        share_ids = {e.share for e in page} | {g[1] for g in map(self.grants.get,
                                                                  {e.grant for e in page}) if g}
        self._fill(self.shares, share_ids,
                   lambda ids: Share.select(Share.id, Share.clinic).where(Share.id.in_(ids))
                   .tuples())
        self._fill(self.members, {e.member for e in page},
                   lambda ids: Member.select(Member.id, Member.clinic)
                   .where(Member.id.in_(ids)).tuples())
        clinic_ids = ({self.shares.get(i) for i in share_ids}
                      | {self.members.get(e.member) for e in page} | {e.clinic for e in page})
        self._fill(self.clinics, clinic_ids,
                   lambda ids: ((c.id, (c.name, c.timezone)) for c in
                                Clinic.select(Clinic.id, Clinic.name, Clinic.timezone)
                                .where(Clinic.id.in_(ids))))
        key = self.runtime.phi_key
        self._fill(self.documents, {e.document for e in page},
                   lambda ids: ((d.id, sealed.document_name(key, d)) for d in
                                Document.select(Document.id, Document.name_sealed)
                                .where(Document.id.in_(ids))))

    @staticmethod
    def _fill(known: dict, ids: set, read) -> None:
        wanted = [i for i in ids if i is not None and i not in known]
        if not wanted:
            return
        if len(known) + len(wanted) > REMEMBERED:
            known.clear()
        known.update(read(wanted))

    def row(self, event) -> dict:
        grant = self.grants.get(event.grant)
        share_id = event.share or (grant[1] if grant else None)
        clinic_id = (self.shares.get(share_id) if share_id else
                     self.members.get(event.member) if event.member else event.clinic)
        clinic_name, zone = self.clinics.get(clinic_id, ("", self.fallback_zone))
        at = event.at if isinstance(event.at, dt.datetime) else dt.datetime.fromisoformat(
            event.at)
        return {
            "seq": event.seq,
            "time_local": local_text(at, zone),
            "time_utc": at.isoformat(timespec="seconds") + "Z",
            "kind": event.kind,
            "actor": event.actor,
            "share": share_id or "",
            "recipient": grant[0] if grant else "",
            "document": self.documents.get(event.document, ""),
            "ip": event.ip,
            "user_agent": event.user_agent,
            "clinic": clinic_name,
            "detail": _detail(event.detail),
            "mac": event.mac,
        }


def _detail(value) -> str:
    """Compact JSON, keys sorted; stored as text (SQLite) or decoded already (PostgreSQL)."""
    if isinstance(value, str):
        value = json.loads(value) if value else None
    return json.dumps(value, sort_keys=True) if value else ""


def chain_head() -> dict:
    """The chain's last link when the export was made: compare it with `audit verify` later."""
    seq, mac = audit.head()
    return {"chain_head_seq": seq, "chain_head_mac": mac}
