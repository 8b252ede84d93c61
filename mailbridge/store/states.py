"""The names stored in state columns, audit events and outbox rows, in one place: a typo is a
NameError, not a state nobody checks for. StrEnum members are the plain strings in the
database, so queries and rows compare with them directly."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum


class Inbound(StrEnum):
    """A spooled message (`inbound_message.state`)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    IGNORED = "ignored"
    REJECTED = "rejected"
    FAILED = "failed"


FINISHED = (Inbound.DONE, Inbound.IGNORED, Inbound.REJECTED, Inbound.FAILED)


class GrantState(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    EXPIRED = "expired"
    REVOKED = "revoked"


LIVE = (GrantState.PENDING, GrantState.CLAIMED)


class Delivery(StrEnum):
    """What became of a grant's link e-mail (`grant.delivery`)."""

    QUEUED = "queued"
    SENT = "sent"
    FAILED = "failed"


class Outbound(StrEnum):
    """An e-mail in the outbox (`outbound_message.state`)."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class Mail(StrEnum):
    """Kinds of e-mail we send (`outbound_message.kind`)."""

    LINK = "link"
    REMINDER = "reminder"
    CODE = "code"
    RESET = "reset"
    REVOKED = "revoked"
    RECEIPT = "receipt"
    NOTICE = "notice"
    REPLY = "reply"
    FIRST_VIEW = "first_view"
    EXPIRY_SUMMARY = "expiry_summary"
    STAFF_CODE = "staff_code"
    ACCESS_CODE = "access_code"  # to someone asking for access: the code for their address
    ACCESS_REQUEST = "access_request"  # to the sender: approve or deny
    ACCESS_REFUSED = "access_refused"  # to the requester: the sender said no
    DOCUMENTS_RETURNED = "documents_returned"  # to the sender: a recipient sent documents back


# To recipients and about their account: no PHI in them, so they may travel in clear.
NO_PHI_MAIL = (Mail.LINK, Mail.REMINDER, Mail.CODE, Mail.RESET, Mail.REVOKED, Mail.STAFF_CODE,
               Mail.ACCESS_CODE, Mail.ACCESS_REFUSED)
# Mail to recipients gets its own return path (VERP), so a bounce names the row it is about.
VERP_MAIL = (Mail.LINK, Mail.REMINDER)


class Audit(StrEnum):
    """Audit event kinds (`audit_event.kind`)."""

    # intake and sender trust
    SHARE_CREATED = "share_created"
    GRANT_CREATED = "grant_created"
    SHARE_REJECTED = "share_rejected"
    SENDER_UNAUTHENTICATED = "sender_unauthenticated"
    AUTHENTICATION_FORGED = "authentication_forged"
    MESSAGE_REPEATED = "message_repeated"
    # managing a share
    REPLY_COMMAND = "reply_command"
    REPLY_REFUSED = "reply_refused"
    STATUS_SENT = "status_sent"
    HELP_SENT = "help_sent"
    GRANT_REVOKED = "grant_revoked"
    SHARE_REVOKED = "share_revoked"
    LINKS_RESENT = "links_resent"
    DEADLINE_EXTENDED = "deadline_extended"
    # jobs and delivery
    GRANT_EXPIRED = "grant_expired"
    SHARE_PURGED = "share_purged"
    LEGAL_HOLD_SET = "legal_hold_set"
    LEGAL_HOLD_RELEASED = "legal_hold_released"
    REMINDER_SENT = "reminder_sent"
    EXPIRY_REPORTED = "expiry_reported"
    LINK_UNDELIVERABLE = "link_undeliverable"
    LINK_BOUNCED = "link_bounced"
    # the operator and staff
    MEMBER_ADDED = "member_added"
    MEMBER_DISABLED = "member_disabled"
    MEMBER_ADMIN_CHANGED = "member_admin_changed"
    CLINIC_ADDED = "clinic_added"
    CLINIC_CHANGED = "clinic_changed"
    AUDIT_EXPORTED = "audit_exported"  # the export holds PHI: who took one is recorded
    # the portal
    LINK_SHOWN = "link_shown"  # a GET of the link page: a person or a mail scanner
    LINK_CONTINUED = "link_continued"  # Continue pressed (a POST): a person
    RESEND_REQUESTED = "resend_requested"  # "Ask for a new link" on an expired link
    CODE_SENT = "code_sent"
    CODE_FAILED = "code_failed"
    CODE_VERIFIED = "code_verified"
    ACCOUNT_CREATED = "account_created"
    CLAIMED = "claimed"
    SIGNED_IN = "signed_in"
    SIGN_IN_FAILED = "sign_in_failed"
    SIGNED_OUT = "signed_out"
    PASSWORD_RESET_REQUESTED = "password_reset_requested"
    PASSWORD_RESET = "password_reset"
    PASSWORD_CHANGED = "password_changed"
    SHARE_ARCHIVED = "share_archived"
    SHARE_RESTORED = "share_restored"
    SHARE_REMOVED = "share_removed"
    DOCUMENT_VIEWED = "document_viewed"
    DOCUMENT_DOWNLOADED = "document_downloaded"
    ACCESS_DENIED = "access_denied"
    # the staff console (actor: the member)
    STAFF_CODE_SENT = "staff_code_sent"
    STAFF_CODE_FAILED = "staff_code_failed"
    STAFF_PASSWORD_SET = "staff_password_set"
    STAFF_SIGNED_IN = "staff_signed_in"
    STAFF_SIGN_IN_FAILED = "staff_sign_in_failed"
    STAFF_SIGNED_OUT = "staff_signed_out"
    PASSKEY_ADDED = "passkey_added"
    CONSOLE_ACTION = "console_action"
    # access requests from forwarded links (actor: the requester's address, or the member)
    ACCESS_CODE_SENT = "access_code_sent"
    ACCESS_CODE_FAILED = "access_code_failed"
    ACCESS_REQUESTED = "access_requested"
    ACCESS_APPROVED = "access_approved"
    ACCESS_REFUSED = "access_refused"
    # documents sent back by a recipient (shares/send_back.py), on the original share
    DOCUMENTS_RETURNED = "documents_returned"
    RETURN_REFUSED = "return_refused"  # wrong type, too large, share ended: nothing stored
    RETURNED_DOCUMENT_VIEWED = "returned_document_viewed"  # in the staff console
    RETURNED_DOCUMENT_DOWNLOADED = "returned_document_downloaded"


class AccessState(StrEnum):
    """An access request (`access_request.state`); an open one past `expires_at` is expired."""

    UNVERIFIED = "unverified"  # a code was sent; the address is not proven yet
    OPEN = "open"  # proven; the sender was asked
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


def grant_state(state: str, deadline: dt.datetime, now: dt.datetime) -> GrantState:
    """The state that counts now: a pending grant past its deadline is expired, whether or
    not the expiry job has run yet (a stopped scheduler can never extend access)."""
    if state == GrantState.PENDING and deadline <= now:
        return GrantState.EXPIRED
    return GrantState(state)
