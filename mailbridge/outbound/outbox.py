"""The transactional outbox: rendered e-mails are queued (sealed) in the same transaction as the
change that caused them, then claimed, sent and marked by the dispatcher."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage

from peewee import Case

from mailbridge.runtime import Runtime, derive_key
from mailbridge.store import queue
from mailbridge.store.blobs import seal, unseal
from mailbridge.store.models import Grant, OutboundMessage, Share
from mailbridge.store.states import NO_PHI_MAIL, VERP_MAIL, Outbound

MAX_ERROR_CHARS = 500
QUEUE = queue.Queue(OutboundMessage, waiting=Outbound.QUEUED, working=Outbound.SENDING)

_VERP_LOCAL = re.compile(r"bounce\+(\d{1,18})\.([0-9a-f]{10})")


def enqueue(runtime: Runtime, msg: EmailMessage, *, kind: str, to_addr: str,
            envelope_from: str | None = None, share: Share | int | None = None,
            grant: Grant | int | None = None) -> OutboundMessage:
    """Queue `msg` for sending. Runs inside the caller's transaction; after the commit the
    caller calls `notify(runtime)` so the dispatcher sends it at once."""
    message_id = msg["Message-ID"]
    if not message_id:
        raise ValueError("an outbound message needs a Message-ID")
    now = runtime.clock()
    # Always CRLF on the wire, whatever policy the message was built with.
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    row = OutboundMessage.create(
        created_at=now, kind=kind, share=share, grant=grant, to_addr=to_addr,
        envelope_from=envelope_from or runtime.settings.outbound.from_,
        message_id=str(message_id),
        sealed=seal(runtime.outbox_key, raw, _aad(str(message_id), to_addr)),
        state=Outbound.QUEUED, attempts=0, next_attempt_at=now)
    if kind in VERP_MAIL and envelope_from is None:
        # The id exists only after the insert; same transaction, so no one sees it without.
        row.envelope_from = verp_address(runtime, row.id)
        (OutboundMessage.update(envelope_from=row.envelope_from)
         .where(OutboundMessage.id == row.id).execute())
    return row


def verp_address(runtime: Runtime, outbound_id: int) -> str:
    """`bounce+<id>.<mac>@<reply_domain>`: the MAC stops forged bounces from failing links."""
    return (f"bounce+{outbound_id}.{_verp_mac(runtime, outbound_id)}"
            f"@{runtime.settings.addresses.reply_domain}")


def verp_outbound_id(runtime: Runtime, address: str) -> int | None:
    """The outbound row a bounce address names; None unless it is one we made."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    if domain.lower() != runtime.settings.addresses.reply_domain.lower():
        return None
    match = _VERP_LOCAL.fullmatch(local.lower())
    if match is None:
        return None
    outbound_id = int(match[1])
    if not hmac.compare_digest(match[2], _verp_mac(runtime, outbound_id)):
        return None
    return outbound_id


def notify(runtime: Runtime) -> None:
    """Wake the dispatcher; call after the transaction that enqueued has committed."""
    runtime.wake_dispatcher.set()


def claim_due(runtime: Runtime, limit: int = 20, node: str = "") -> list[OutboundMessage]:
    """Take up to `limit` rows that are due (or whose sender crashed mid-send) and lease them
    for `[worker] lease_seconds` (the sender renews the lease while it holds them).

    Each row is taken with a conditional UPDATE, so two dispatchers (two nodes) never get
    the same row. Claiming counts as an attempt: a message that crashes the dispatcher
    still runs out of attempts.
    """
    claimed = queue.claim(runtime.db, QUEUE, now=runtime.clock(), node=node, limit=limit,
                          lease_seconds=runtime.settings.worker.lease_seconds)
    if not claimed:
        return []
    return list(OutboundMessage.select().where(OutboundMessage.id.in_(claimed))
                .order_by(OutboundMessage.next_attempt_at, OutboundMessage.id))


def open_message(runtime: Runtime, row: OutboundMessage) -> bytes:
    """The message bytes to send; raises cryptography's InvalidTag if the row was tampered."""
    return unseal(runtime.outbox_key, bytes(row.sealed), _aad(row.message_id, row.to_addr))


def mark_sent(runtime: Runtime, row: OutboundMessage) -> None:
    _set(row, state=Outbound.SENT, sent_at=runtime.clock(), lease_until=None, last_error="")


def mark_retry(runtime: Runtime, row: OutboundMessage, error: str) -> str:
    """Back off exponentially, or fail once the attempts are used up. Returns the new state."""
    out = runtime.settings.outbound
    if row.attempts >= out.max_attempts:
        mark_failed(runtime, row, error)
        return Outbound.FAILED
    delay = min(out.retry_base_seconds * 2 ** max(row.attempts - 1, 0), out.retry_max_seconds)
    _set(row, state=Outbound.QUEUED, lease_until=None, last_error=_clip(error),
         next_attempt_at=runtime.clock() + dt.timedelta(seconds=delay))
    return Outbound.QUEUED


def carries_phi(kind: str) -> bool:
    """What recipients get carries no PHI (no subject, filenames or note); everything else,
    and any kind added later, is treated as carrying it (receipts, notices, summaries)."""
    return kind not in NO_PHI_MAIL


def hold(runtime: Runtime, row: OutboundMessage, error: str) -> None:
    """Not sent because of the configuration, not the message: wait `retry_max_seconds`
    without using up an attempt, so a restart with a fixed configuration still sends it."""
    delay = runtime.settings.outbound.retry_max_seconds
    _set(row, state=Outbound.QUEUED, lease_until=None, last_error=_clip(error),
         attempts=max(row.attempts - 1, 0),
         next_attempt_at=runtime.clock() + dt.timedelta(seconds=delay))


def mark_failed(runtime: Runtime, row: OutboundMessage, error: str) -> None:
    _set(row, state=Outbound.FAILED, lease_until=None, last_error=_clip(error))


def release(runtime: Runtime, rows: Iterable[OutboundMessage]) -> None:
    """Hand claimed but unsent rows back (the dispatcher is stopping); the claim is undone —
    unless another node has taken a row over since. Runs in the caller's transaction."""
    by_node: dict[str, list[int]] = {}
    for row in rows:
        by_node.setdefault(row.claimed_by, []).append(row.id)
    for node, ids in by_node.items():
        queue.release(QUEUE, ids, node)


def recover(runtime: Runtime, node: str) -> int:
    """At start: rows this node was sending when it last stopped are due again now (the
    interrupted attempt still counts). Other nodes' rows wait for their lease."""
    return queue.recover(runtime.db, QUEUE, node, runtime.clock())


def _set(row: OutboundMessage, **values) -> None:
    OutboundMessage.update(**values).where(OutboundMessage.id == row.id).execute()
    for name, value in values.items():
        setattr(row, name, value)


def _verp_mac(runtime: Runtime, outbound_id: int) -> str:
    key = derive_key(runtime.outbox_key, "verp")  # never the sealing key itself
    return hmac.new(key, f"bounce {outbound_id}".encode(), hashlib.sha256).hexdigest()[:10]


def _aad(message_id: str, to_addr: str) -> bytes:
    # Binds the sealed bytes to their row: a sealed message copied to another row won't open.
    return f"outbox\x00{message_id}\x00{to_addr}".encode()


def _clip(error: str) -> str:
    # Callers pass relay responses and error classes, never message content.
    return " ".join(error.split())[:MAX_ERROR_CHARS]


# --- many at once (the jobs' reminders and summaries) ---------------------------------------

INSERT_PAGE = 500  # rows per INSERT (SQLite allows 32766 bound values; a row binds 12)


@dataclass(frozen=True)
class Queued:
    """One e-mail for `enqueue_many`: what `enqueue` takes, for a row of a batch."""

    msg: EmailMessage
    kind: str
    to_addr: str
    share: int | None = None
    grant: int | None = None


def enqueue_many(runtime: Runtime, items: Sequence[Queued]) -> int:
    """`enqueue` for a batch, in the caller's transaction: the rows in multi-row INSERTs, then
    the VERP return paths (which need the ids) in one UPDATE per page. Returns the count."""
    now = runtime.clock()
    sender = runtime.settings.outbound.from_
    rows = []
    for item in items:
        message_id = str(item.msg["Message-ID"] or "")
        if not message_id:
            raise ValueError("an outbound message needs a Message-ID")
        raw = item.msg.as_bytes(policy=item.msg.policy.clone(linesep="\r\n"))
        rows.append(dict(created_at=now, kind=item.kind, share=item.share, grant=item.grant,
                         to_addr=item.to_addr, envelope_from=sender, message_id=message_id,
                         sealed=seal(runtime.outbox_key, raw, _aad(message_id, item.to_addr)),
                         state=Outbound.QUEUED, attempts=0, next_attempt_at=now))
    verp = []
    for start in range(0, len(rows), INSERT_PAGE):
        page = rows[start:start + INSERT_PAGE]
        created = (OutboundMessage.insert_many(page)
                   .returning(OutboundMessage.id, OutboundMessage.message_id).tuples().execute())
        # Matched by Message-ID: RETURNING does not promise the order of the VALUES.
        kinds = {row["message_id"]: row["kind"] for row in page}
        verp += [row_id for row_id, message_id in created if kinds[message_id] in VERP_MAIL]
    for start in range(0, len(verp), INSERT_PAGE):
        ids = verp[start:start + INSERT_PAGE]
        (OutboundMessage
         .update(envelope_from=Case(OutboundMessage.id,
                                    [(row_id, verp_address(runtime, row_id)) for row_id in ids]))
         .where(OutboundMessage.id.in_(ids)).execute())
    return len(rows)

