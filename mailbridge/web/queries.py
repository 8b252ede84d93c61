"""The portal's per-request lookups, compiled once per app (store/prepared.py): whose session
a cookie opens, and which document an account may open with which grant."""

from __future__ import annotations

import peewee

from mailbridge.store.models import Account, Clinic, Document, Grant, Share, WebSession
from mailbridge.store.prepared import Prepared
from mailbridge.store.states import GrantState


def _session(id_hash: str) -> peewee.Query:
    # The account comes in the same query: every signed-in request needs it.
    return (WebSession.select(WebSession, Account)
            .join(Account, peewee.JOIN.LEFT_OUTER, on=(WebSession.account == Account.id))
            .where((WebSession.id_hash == id_hash) & WebSession.ended_at.is_null())
            .limit(1))


def opens(account, share) -> peewee.Expression:
    """The grant that opens `share` to `account` (either an id or an expression): claimed by
    that account and neither revoked nor removed from its library. The only thing that does."""
    return ((Grant.account == account) & (Grant.share == share)
            & (Grant.state == GrantState.CLAIMED) & Grant.removed_at.is_null())


def _document(account_id: int, document_id: int) -> peewee.Query:
    # Share and clinic come along (serving reads the clinic's policy), and the grant that
    # opens the share to the account.
    return (Document.select(Document, Share, Clinic, Grant).join(Share).join(Clinic)
            .switch(Share).join(Grant, on=opens(account_id, Share.id), attr="opening_grant")
            .where(Document.id == document_id).limit(1))


class PortalQueries:
    def __init__(self) -> None:
        self.session = Prepared(_session, str)
        self.document = Prepared(_document, int, int)
