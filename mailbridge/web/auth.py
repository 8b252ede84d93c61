"""Signing in, creating accounts and claiming grants — shared by the link flow and the
account pages, so both obey the same throttling and the same rules.

Throttling counts `sign_in_failed` audit events: per address and IP (5 in 15 minutes), per
IP across addresses (30), and per address from anywhere (20) — the last one is waived for a
browser that has signed in to that account before (a signed device cookie), so an attacker
hammering an address cannot lock its real owner out. Failures are recorded for addresses
without an account too, so throttling reveals nothing about which accounts exist.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import peewee
from flask import request
from itsdangerous import BadSignature, URLSafeSerializer

from mailbridge.runtime import Runtime
from mailbridge.store import audit
from mailbridge.store.models import Account, AuditEvent, Grant
from mailbridge.store.states import Audit, GrantState
from mailbridge.web.passwords import DUMMY_HASH, hash_password, needs_rehash, verify_password

WINDOW = dt.timedelta(minutes=15)
PER_PAIR, PER_IP, PER_ACCOUNT = 5, 30, 20
DEVICE_COOKIE = "mb_device"
DEVICE_COOKIE_DAYS = 180


@dataclass(frozen=True)
class Throttled:
    message: str = "Too many attempts. Please wait 15 minutes and try again."


class AccountExists(Exception):
    """Never overwrite an account through a link: its owner signs in instead."""


def _failures(runtime: Runtime, kind: str = Audit.SIGN_IN_FAILED, **where) -> int:
    since = runtime.clock() - WINDOW
    query = AuditEvent.select().where((AuditEvent.kind == kind) & (AuditEvent.at > since))
    for field, value in where.items():
        query = query.where(getattr(AuditEvent, field) == value)
    return query.count()


def _device_accounts(runtime: Runtime) -> set[int]:
    raw = request.cookies.get(DEVICE_COOKIE, "")
    if not raw:
        return set()
    try:
        return set(URLSafeSerializer(runtime.web_key, salt="device").loads(raw))
    except (BadSignature, TypeError, ValueError):
        return set()


def device_cookie_value(runtime: Runtime, account: Account) -> str:
    """The cookie to set after a successful sign-in (remembers up to 10 accounts)."""
    known = sorted(_device_accounts(runtime) | {account.id})[-10:]
    return URLSafeSerializer(runtime.web_key, salt="device").dumps(known)


def throttled(runtime: Runtime, address: str, ip: str, kind: str, *,
              trusted_device: bool) -> bool:
    """Too many recent failures (audit events of `kind`) for this address from this IP, from
    this IP, or — unless the browser is trusted for the account — for this address."""
    return (_failures(runtime, kind, actor=address, ip=ip) >= PER_PAIR
            or _failures(runtime, kind, ip=ip) >= PER_IP
            or (not trusted_device and _failures(runtime, kind, actor=address) >= PER_ACCOUNT))


def authenticate(runtime: Runtime, address: str, password: str) -> Account | Throttled | None:
    """The account if the password is right; None if not (same answer with no account)."""
    address = address.strip().lower()
    ip = request.remote_addr or ""
    account = Account.get_or_none(Account.email == address)
    trusted_device = account is not None and account.id in _device_accounts(runtime)
    if throttled(runtime, address, ip, Audit.SIGN_IN_FAILED, trusted_device=trusted_device):
        return Throttled()
    ok = verify_password(account.password_hash if account else DUMMY_HASH, password)
    now = runtime.clock()
    with runtime.db.atomic():
        if not (ok and account):
            audit.record(runtime.audit_key, Audit.SIGN_IN_FAILED, now, actor=address,
                         account=account, ip=ip,
                         user_agent=request.headers.get("User-Agent", "")[:400])
            return None
        if needs_rehash(account.password_hash):
            account.password_hash = hash_password(password)
            account.save()
        audit.record(runtime.audit_key, Audit.SIGNED_IN, now, actor=address, account=account, ip=ip,
                     user_agent=request.headers.get("User-Agent", "")[:400])
    return account


def create_account(runtime: Runtime, address: str, password: str) -> Account:
    """After the mailbox was proven by a code. Raises AccountExists rather than overwrite."""
    now = runtime.clock()
    try:
        with runtime.db.atomic():
            account = Account.create(email=address.lower(), password_hash=hash_password(password),
                                     created_at=now, verified_at=now)
            audit.record(runtime.audit_key, Audit.ACCOUNT_CREATED, now, actor=account.email,
                         account=account,
                         ip=request.remote_addr or "",
                         user_agent=request.headers.get("User-Agent", "")[:400])
    except peewee.IntegrityError:
        raise AccountExists(address) from None
    return account


def claim_grant(runtime: Runtime, grant: Grant, account: Account) -> bool:
    """Bind a pending grant to the account whose verified address it was sent to, before its
    deadline. True if it is (now or already) claimed by this account."""
    if grant.address != account.email:
        return False
    now = runtime.clock()
    with runtime.db.atomic():
        changed = (Grant.update(state=GrantState.CLAIMED, account=account, claimed_at=now)
                   .where((Grant.id == grant.id) & (Grant.state == GrantState.PENDING)
                          & (Grant.deadline > now)).execute())
        if changed:
            audit.record(runtime.audit_key, Audit.CLAIMED, now, actor=account.email,
                         account=account,
                         share=grant.share_id, grant=grant, ip=request.remote_addr or "",
                         user_agent=request.headers.get("User-Agent", "")[:400])
    fresh = Grant.get_by_id(grant.id)
    return fresh.state == GrantState.CLAIMED and fresh.account_id == account.id
