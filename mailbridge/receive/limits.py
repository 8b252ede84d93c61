"""Intake budgets per SMTP client and per envelope sender: messages and bytes accepted in the
last hour, counted from the spool itself (so they hold across restarts and nodes)."""

from __future__ import annotations

import datetime as dt

import peewee

from mailbridge.runtime import Runtime
from mailbridge.store.models import InboundMessage

WINDOW = dt.timedelta(hours=1)
OVER_BUDGET = "451 4.7.1 Too much mail from you in the last hour, please try again later"


def _usage(condition, since: dt.datetime) -> tuple[int, int]:
    count, size = (InboundMessage
                   .select(peewee.fn.COUNT(InboundMessage.id),
                           peewee.fn.COALESCE(peewee.fn.SUM(InboundMessage.size), 0))
                   .where(condition & (InboundMessage.received_at > since))
                   .scalar(as_tuple=True))
    return int(count or 0), int(size or 0)


def over_budget(runtime: Runtime, *, client_ip: str, sender: str, ip_exempt: bool,
                incoming_bytes: int = 0) -> bool:
    """Would one more message of `incoming_bytes` exceed `[smtp]`'s hourly budgets? A trusted
    relay (all mail of an MTA in front comes from its IP) has no per-IP budget; bounces
    (null sender) no per-sender one. A budget of 0 is off."""
    cfg = runtime.settings.smtp
    since = runtime.clock() - WINDOW
    checks = []
    if not ip_exempt and client_ip:
        checks.append((InboundMessage.client_ip == client_ip,
                       cfg.max_messages_per_hour_per_ip, cfg.max_bytes_per_hour_per_ip))
    if sender:
        checks.append((InboundMessage.envelope_from == sender,
                       cfg.max_messages_per_hour_per_sender, cfg.max_bytes_per_hour_per_sender))
    for condition, max_messages, max_bytes in checks:
        if not max_messages and not max_bytes:
            continue
        messages, size = _usage(condition & InboundMessage.channel.in_(("smtp", "lmtp")),
                                since)
        if max_messages and messages + 1 > max_messages:
            return True
        if max_bytes and size + incoming_bytes > max_bytes:
            return True
    return False
