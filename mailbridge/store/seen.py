"""Members' messages that were acted on, by keys a replay cannot change (mail.identity): the
unique index makes the database itself refuse a second action on the same message."""

from __future__ import annotations

import datetime as dt

from mailbridge.store.models import InboundMessage, Member, SeenMessage


def seen(member: Member, keys: list[str]) -> bool:
    return SeenMessage.select().where((SeenMessage.member == member)
                                      & SeenMessage.key.in_(keys)).exists()


def remember(member: Member, keys: list[str], row: InboundMessage, now: dt.datetime) -> None:
    """Inside the transaction that acts on the message: a concurrent copy of the same message
    fails here with an IntegrityError and its whole transaction is rolled back."""
    for key in keys:
        SeenMessage.create(member=member, key=key, inbound=row, seen_at=now)
