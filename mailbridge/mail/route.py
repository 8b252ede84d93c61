"""Which of our addresses a message was sent to: the sharing address, a receipt's reply
address (or our From address), or a bounce (VERP) address."""

from __future__ import annotations

import enum

from mailbridge.settings import Settings


class Route(enum.Enum):
    SHARE = "share"
    REPLY = "reply"
    BOUNCE = "bounce"


def classify_address(address: str, settings: Settings) -> Route | None:
    """None for addresses we do not receive mail for."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    local, domain = local.lower(), domain.lower()
    if not local:
        return None
    if domain == settings.sharing_domain.lower():
        base = local.split("+", 1)[0]
        if base == settings.sharing_local.lower():
            return Route.SHARE
    # Replies to mail without a reply+key address (notices) reach our From address; they are
    # matched to a share by In-Reply-To/References.
    if f"{local}@{domain}" == settings.outbound.from_.lower():
        return Route.REPLY
    if domain == settings.addresses.reply_domain.lower():
        if local.startswith("reply+") and len(local) > len("reply+"):
            return Route.REPLY
        if local.startswith("bounce+") and len(local) > len("bounce+"):
            return Route.BOUNCE
    return None


def route_message(envelope_to: list[str], settings: Settings) -> Route | None:
    """A message for several of our addresses is routed by the most specific one:
    bounces, then replies, then shares."""
    routes = {classify_address(a, settings) for a in envelope_to} - {None}
    for route in (Route.BOUNCE, Route.REPLY, Route.SHARE):
        if route in routes:
            return route
    return None
