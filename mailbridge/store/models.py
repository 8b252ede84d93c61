"""The tables: clinics and members (senders), shares with documents and per-recipient grants,
portal accounts, the audit trail, the inbound spool and the outbound queue.

All times are naive UTC. Models are bound to a database by `db.open_database`.
"""

from __future__ import annotations

import json

import peewee as pw

from mailbridge.store.states import Delivery, GrantState, Inbound, Outbound


class JSONField(pw.TextField):
    def db_value(self, value):
        return None if value is None else json.dumps(value, sort_keys=True)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(pw.Model):
    class Meta:
        legacy_table_names = False


class SchemaVersion(BaseModel):
    version = pw.IntegerField(primary_key=True)
    applied_at = pw.DateTimeField()


class Clinic(BaseModel):
    """A clinic and its own policy. Empty policy values fall back to the configuration."""

    name = pw.CharField(max_length=200, unique=True)
    timezone = pw.CharField(max_length=64, default="UTC")
    created_at = pw.DateTimeField()
    display_name = pw.CharField(max_length=200, default="")  # "Riverside PT" in From names
    contact = pw.CharField(max_length=200, default="")  # "Front desk: (555) 010-0200"
    claim_hours = pw.FloatField(null=True)
    remind_before_hours = pw.FloatField(null=True)
    document_retention_days = pw.FloatField(null=True)  # None: kept for good
    legal_hold = pw.BooleanField(default=False)  # nothing of the clinic's is purged
    watermark = pw.BooleanField(null=True)  # None: [documents] watermark decides


class Member(BaseModel):
    """Staff allowed to share: an address at a clinic."""

    email = pw.CharField(max_length=320, unique=True)
    name = pw.CharField(max_length=200)
    clinic = pw.ForeignKeyField(Clinic, backref="members", on_delete="RESTRICT")
    active = pw.BooleanField(default=True)
    is_admin = pw.BooleanField(default=False)
    created_at = pw.DateTimeField()


class InboundMessage(BaseModel):
    """The durable intake spool: one row per accepted message; the raw bytes are in the
    encrypted blob store under `blob_id`."""

    received_at = pw.DateTimeField()
    channel = pw.CharField(max_length=16)  # smtp | imap
    envelope_from = pw.CharField(max_length=320, default="")
    envelope_to = JSONField(default=list)
    # Where it came from: the SMTP client's IP ("" for IMAP) and how (SMTP, ESMTP, ESMTPS,
    # IMAP); the client decides whether Authentication-Results headers can be trusted.
    client_ip = pw.CharField(max_length=64, default="")
    protocol = pw.CharField(max_length=16, default="")
    size = pw.BigIntegerField()
    blob_id = pw.CharField(max_length=64, index=True)  # the orphan sweep looks files up
    blob_key = pw.BlobField()
    raw_sha256 = pw.CharField(max_length=64)
    source_key = pw.CharField(max_length=400, null=True, unique=True)  # e.g. IMAP uid
    state = pw.CharField(max_length=16, default=Inbound.QUEUED, index=True)
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField()
    lease_until = pw.DateTimeField(null=True)
    claimed_by = pw.CharField(max_length=200, default="")  # node that holds the lease
    outcome = pw.CharField(max_length=32, default="")
    reason = pw.TextField(default="")
    finished_at = pw.DateTimeField(null=True)
    purged_at = pw.DateTimeField(null=True)
    error_sealed = pw.BlobField(default=b"")  # a traceback (phi.py): it may quote the message

    class Meta:
        indexes = ((("state", "next_attempt_at"), False), (("client_ip", "received_at"), False),
                   (("envelope_from", "received_at"), False))


class Share(BaseModel):
    clinic = pw.ForeignKeyField(Clinic, backref="shares", on_delete="RESTRICT")
    sender = pw.ForeignKeyField(Member, backref="shares", on_delete="RESTRICT")
    inbound = pw.ForeignKeyField(InboundMessage, null=True, on_delete="SET NULL")
    # The member's subject and note are PHI: sealed, bound to this row (phi.py).
    title_sealed = pw.BlobField(default=b"")
    note_sealed = pw.BlobField(default=b"")
    created_at = pw.DateTimeField()
    # Message-ID + content hash: the same message arriving twice makes one share.
    dedupe_key = pw.CharField(max_length=128, unique=True)
    reply_key_hash = pw.CharField(max_length=64, unique=True)
    receipt_message_id = pw.CharField(max_length=400, default="")
    legal_hold = pw.BooleanField(default=False)  # never purged while set
    purged_at = pw.DateTimeField(null=True)  # documents crypto-shredded under retention


class Document(BaseModel):
    share = pw.ForeignKeyField(Share, backref="documents", on_delete="CASCADE")
    position = pw.IntegerField()
    name_sealed = pw.BlobField(default=b"")  # the sender's filename is PHI too (phi.py)
    kind = pw.CharField(max_length=16)  # pdf, png, ... (config.DEFAULT_ALLOWED_TYPES)
    content_type = pw.CharField(max_length=100)
    size = pw.BigIntegerField()
    sha256 = pw.CharField(max_length=64)
    blob_id = pw.CharField(max_length=64, unique=True)
    blob_key = pw.BlobField()


class Account(BaseModel):
    """A recipient's portal account; the address is proven by a one-time code."""

    email = pw.CharField(max_length=320, unique=True)
    password_hash = pw.CharField(max_length=200)
    created_at = pw.DateTimeField()
    verified_at = pw.DateTimeField()


class Grant(BaseModel):
    """One recipient's access to one share: a link bound to an address, claimable until
    `deadline`."""

    share = pw.ForeignKeyField(Share, backref="grants", on_delete="CASCADE")
    address = pw.CharField(max_length=320, index=True)
    token_hash = pw.CharField(max_length=64, unique=True)
    # state, deadline and account: partial indexes (PARTIAL_INDEXES).
    state = pw.CharField(max_length=16, default=GrantState.PENDING, index=False)
    deadline = pw.DateTimeField(index=False)
    created_at = pw.DateTimeField()
    claimed_at = pw.DateTimeField(null=True)
    account = pw.ForeignKeyField(Account, null=True, backref="grants", on_delete="SET NULL",
                                 index=False)
    ended_at = pw.DateTimeField(null=True)  # when it was revoked or expired
    delivery = pw.CharField(max_length=16, default=Delivery.QUEUED)
    archived_at = pw.DateTimeField(null=True)  # the recipient moved it to "Archived"
    reminded_at = pw.DateTimeField(null=True)  # the one reminder before the deadline
    expiry_reported_at = pw.DateTimeField(null=True)  # told the sender it lapsed
    first_view_reported_at = pw.DateTimeField(null=True)  # told the sender it was opened
    removed_at = pw.DateTimeField(null=True)  # the recipient removed it from the library


class OutboundMessage(BaseModel):
    """The transactional outbox. The rendered message is sealed with the master key: receipts
    name files and recipients."""

    created_at = pw.DateTimeField()
    kind = pw.CharField(max_length=32)  # link | receipt | notice | ...
    share = pw.ForeignKeyField(Share, null=True, backref="outbound", on_delete="SET NULL")
    grant = pw.ForeignKeyField(Grant, null=True, backref="outbound", on_delete="SET NULL")
    to_addr = pw.CharField(max_length=320)
    envelope_from = pw.CharField(max_length=320)
    message_id = pw.CharField(max_length=400, index=True)
    sealed = pw.BlobField()
    state = pw.CharField(max_length=16, default=Outbound.QUEUED)
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField()
    lease_until = pw.DateTimeField(null=True)
    claimed_by = pw.CharField(max_length=200, default="")  # node that holds the lease
    last_error = pw.TextField(default="")
    sent_at = pw.DateTimeField(null=True)

    class Meta:
        indexes = ((("state", "next_attempt_at"), False),)


def reference(model, **kwargs) -> pw.ForeignKeyField:
    """A nullable reference to `model`'s row by id, with no foreign-key constraint in the
    database (peewee's deferred foreign key that is never created)."""
    return pw.ForeignKeyField(model, null=True, _deferred=True, **kwargs)


class AuditEvent(BaseModel):
    """One event of the audit trail, chained: `mac` covers its content and the `mac` of the
    event before it (`seq` - 1), so an edit, deletion, insertion or reordering shows."""

    seq = pw.BigIntegerField(unique=True)
    mac = pw.CharField(max_length=64)
    at = pw.DateTimeField(index=True)
    kind = pw.CharField(max_length=48, index=True)
    actor = pw.CharField(max_length=320, default="")
    # Plain references (no constraint): a ledger outlives what it names, and a constraint's
    # SET NULL would rewrite a chained event; the bulk COPY also skips two lookups per event.
    share = reference(Share, backref="events")
    grant = reference(Grant, backref="events")
    # These five are mostly empty: partial indexes (PARTIAL_INDEXES).
    document = reference(Document, index=False)
    member = reference(Member, index=False)
    account = reference(Account, index=False)
    inbound = reference(InboundMessage, index=False)
    clinic = reference(Clinic, index=False)  # policy changes
    ip = pw.CharField(max_length=64, default="")
    user_agent = pw.CharField(max_length=400, default="")
    detail = JSONField(default=dict)


class AuditHead(BaseModel):
    """The chain's last link (one row): appending reads and moves it in the same transaction,
    locked, so events from any number of processes and nodes form one chain."""

    seq = pw.BigIntegerField(default=0)
    mac = pw.CharField(max_length=64, default="")


class AuditCheckpoint(BaseModel):
    """Events up to `seq` were pruned under `[retention] audit_retention_days`; `mac` is the
    last pruned event's, `signature` vouches for both, so `audit verify` starts here."""

    seq = pw.BigIntegerField(unique=True)
    mac = pw.CharField(max_length=64)
    at = pw.DateTimeField()
    pruned = pw.BigIntegerField()
    signature = pw.CharField(max_length=64)


class SeenMessage(BaseModel):
    """A member's authenticated message that was acted on, by a key a replay cannot change
    (replay.message_keys): the unique index makes the database refuse a second action."""

    member = pw.ForeignKeyField(Member, on_delete="CASCADE")
    key = pw.CharField(max_length=80)  # mid:/sig:/body: + SHA-256 hex
    inbound = pw.ForeignKeyField(InboundMessage, null=True, on_delete="SET NULL")
    seen_at = pw.DateTimeField()

    class Meta:
        indexes = ((("member", "key"), True),)


class WebSession(BaseModel):
    """A portal session; the browser holds a random id, we store only its hash. Signed in, it
    is either a recipient's (`account`) or a staff member's (`member`), never both."""

    id_hash = pw.CharField(max_length=64, primary_key=True)
    account = pw.ForeignKeyField(Account, null=True, backref="sessions", on_delete="CASCADE")
    member = pw.ForeignKeyField(Member, null=True, backref="sessions", on_delete="CASCADE")
    data = JSONField(default=dict)  # CSRF token, a mailbox proven by code before sign-up
    created_at = pw.DateTimeField()
    last_seen_at = pw.DateTimeField(index=True)
    ended_at = pw.DateTimeField(null=True)
    ip = pw.CharField(max_length=64, default="")
    user_agent = pw.CharField(max_length=400, default="")


class OneTimeCode(BaseModel):
    """A 6-digit code e-mailed to a grant's address to prove the mailbox."""

    grant = pw.ForeignKeyField(Grant, backref="codes", on_delete="CASCADE")
    code_hash = pw.CharField(max_length=200)
    created_at = pw.DateTimeField()
    expires_at = pw.DateTimeField()
    attempts = pw.IntegerField(default=0)
    used_at = pw.DateTimeField(null=True)


class StaffAccount(BaseModel):
    """A member's staff console password; the address was proven by a one-time code. Apart
    from recipients' `Account`s: the same address can be both, with two passwords."""

    member = pw.ForeignKeyField(Member, unique=True, backref="staff_accounts",
                                on_delete="CASCADE")
    password_hash = pw.CharField(max_length=200)
    created_at = pw.DateTimeField()
    verified_at = pw.DateTimeField()


class StaffCode(BaseModel):
    """A 6-digit code e-mailed to a member's address: first sign-in or a forgotten password."""

    member = pw.ForeignKeyField(Member, backref="staff_codes", on_delete="CASCADE")
    code_hash = pw.CharField(max_length=200)
    created_at = pw.DateTimeField()
    expires_at = pw.DateTimeField()
    attempts = pw.IntegerField(default=0)
    used_at = pw.DateTimeField(null=True)


class StaffPasskey(BaseModel):
    """A member's WebAuthn credential (a passkey): the public key and its signature counter."""

    member = pw.ForeignKeyField(Member, backref="passkeys", on_delete="CASCADE")
    credential_id = pw.CharField(max_length=1400, unique=True)  # base64url
    public_key = pw.BlobField()
    sign_count = pw.BigIntegerField(default=0)
    created_at = pw.DateTimeField()
    last_used_at = pw.DateTimeField(null=True)


class PasswordReset(BaseModel):
    account = pw.ForeignKeyField(Account, backref="resets", on_delete="CASCADE")
    token_hash = pw.CharField(max_length=64, unique=True)
    created_at = pw.DateTimeField()
    expires_at = pw.DateTimeField()
    used_at = pw.DateTimeField(null=True)


# (name, table, column, WHERE): indexes holding only the rows a query looks for. Every index
# entry costs each bulk write (a million expired grants, a million audit events), so the rows
# the jobs look for (pending by deadline, expired and not reported by share) and references
# that are mostly empty are indexed only where they apply; `x = ?` still uses them. Made by
# migration 14 (not by create_tables: version 1 builds today's tables before later migrations
# add some of these columns).
PARTIAL_INDEXES = (
    ("grant_pending_deadline", "grant", "deadline", "\"state\" = 'pending'"),
    ("grant_expired_unreported", "grant", "share_id",
     "\"state\" = 'expired' AND \"expiry_reported_at\" IS NULL"),
    ("grant_account_id_set", "grant", "account_id", "\"account_id\" IS NOT NULL"),
    *((f"audit_event_{ref}_id_set", "audit_event", f"{ref}_id", f"\"{ref}_id\" IS NOT NULL")
      for ref in ("document", "member", "account", "inbound", "clinic")),
)

ALL_MODELS = [SchemaVersion, Clinic, Member, InboundMessage, Share, Document, Account, Grant,
              OutboundMessage, AuditEvent, WebSession, OneTimeCode, PasswordReset, SeenMessage,
              AuditHead, AuditCheckpoint, StaffAccount, StaffCode, StaffPasskey]


class Blob(BaseModel):
    """An encrypted blob kept in the database (`[storage] backend = "database"`): its header
    here, its sealed records in `BlobChunk` rows, so every node reads it."""

    blob_id = pw.CharField(max_length=32, primary_key=True)
    store = pw.CharField(max_length=16)  # "documents" or "spool"
    header = pw.BlobField()
    # wall-clock seconds, like a file's time (orphan sweep); double: PostgreSQL's REAL (what
    # FloatField makes) rounds today's epoch seconds to about two minutes
    created_at = pw.DoubleField()

    class Meta:
        indexes = ((("store", "created_at"), False),)


class BlobChunk(BaseModel):
    blob = pw.CharField(max_length=32)  # Blob.blob_id; rows go first when a blob is deleted
    seq = pw.IntegerField()
    data = pw.BlobField()

    class Meta:
        primary_key = pw.CompositeKey("blob", "seq")


ALL_MODELS += [Blob, BlobChunk]  # noqa: E305


class AccessRequest(BaseModel):
    """Someone holding another recipient's link asks for access for their own address: proven
    by a one-time code (stored on the row, as a hash), then answered by the share's sender."""

    share = pw.ForeignKeyField(Share, backref="access_requests", on_delete="CASCADE")
    origin = pw.ForeignKeyField(Grant, backref="access_requests", on_delete="CASCADE")
    address = pw.CharField(max_length=320, index=True)  # the requester's, proven by the code
    name = pw.CharField(max_length=100, default="")  # as the requester typed it, unproven
    state = pw.CharField(max_length=16, default="unverified", index=True)
    created_at = pw.DateTimeField(index=True)
    code_hash = pw.CharField(max_length=200)
    code_expires_at = pw.DateTimeField()
    code_attempts = pw.IntegerField(default=0)
    requested_at = pw.DateTimeField(null=True)  # the code was right: the sender was asked
    expires_at = pw.DateTimeField(null=True)  # unanswered by then: expired
    notice_message_id = pw.CharField(max_length=400, default="", index=True)  # to the sender
    decided_at = pw.DateTimeField(null=True)
    decided_by = pw.CharField(max_length=320, default="")
    grant = pw.ForeignKeyField(Grant, null=True, on_delete="SET NULL")  # made by approving
    ip = pw.CharField(max_length=64, default="")


ALL_MODELS += [AccessRequest]  # noqa: E305


class SentBack(BaseModel):
    """Documents a recipient sent back to the sender of `original`. They are kept as a share
    of their own (`share`, made by the sender's member row), so encryption, retention, backups
    and the orphan sweep treat them like any document; for a member without a console account
    that share also has a grant for the member's own address."""

    share = pw.ForeignKeyField(Share, unique=True, backref="sent_back_as", on_delete="CASCADE")
    original = pw.ForeignKeyField(Share, backref="sent_back", on_delete="CASCADE")
    grant = pw.ForeignKeyField(Grant, null=True, on_delete="SET NULL")  # who sent them back
    address = pw.CharField(max_length=320)  # the recipient's address, kept if the grant goes
    via = pw.CharField(max_length=16)  # "console" | "portal": where the sender opens them
    created_at = pw.DateTimeField()



ALL_MODELS += [SentBack]  # noqa: E305
