"""What every staff console page needs: the signed-in member (checked on every request, so a
disabled member loses the console at once), the admin check, and the audit helper."""

from __future__ import annotations

import functools

from flask import abort, redirect, request, session, url_for

from mailbridge.store.models import Member
from mailbridge.web import access, sessions
from mailbridge.web.access import CSP_WITH_SCRIPT

__all__ = ["CSP_WITH_SCRIPT", "current_member", "require_member", "require_admin", "record",
           "page_after_sign_in"]

# The console page a signed-out member asked for (a link in one of our e-mails), kept in the
# session so that signing in — by password, passkey or a first code — leads there.
NEXT_PAGE = "staff_next"


def current_member() -> Member | None:
    """The member of this session, if still active; a disabled member's session ends here."""
    member = getattr(session, "member", None)
    if member is None:
        return None
    fresh = Member.get_or_none(Member.id == member.id)
    if fresh is None or not fresh.active:
        sessions.sign_out(session._get_current_object(), access.now())
        return None
    return fresh


def require_member(view):
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        member = current_member()
        if member is None:
            return _to_sign_in()
        return view(member, *args, **kwargs)

    return wrapper


def require_admin(view):
    """Clinic pages: a member who is not an admin gets the same 404 as for nothing there."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        member = current_member()
        if member is None:
            return _to_sign_in()
        if not member.is_admin:
            abort(404)
        return view(member, *args, **kwargs)

    return wrapper


def _to_sign_in():
    if request.method == "GET":
        session[NEXT_PAGE] = request.full_path.rstrip("?")[:500]
    return redirect(url_for("staff_auth.signin_page"))


def page_after_sign_in() -> str | None:
    """The console page asked for before signing in, if it is one of ours (never another
    site: only paths under /staff/ are taken)."""
    wanted = session.get(NEXT_PAGE)
    if isinstance(wanted, str) and wanted.startswith("/staff/") and wanted.isprintable():
        return wanted
    return None


def record(kind: str, member: Member | None, **refs) -> None:
    access.record(kind, actor=refs.pop("actor", member.email if member else ""),
                  member=member, **refs)


def wants_json() -> bool:
    return request.is_json
