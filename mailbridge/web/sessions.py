"""Portal sessions. Signed in: server-side — the browser holds a random id (HttpOnly,
SameSite=Lax), the database its hash, the account and small data (the CSRF token); signing
out, a password reset or a revoked account end them at once. Not signed in: the little there
is (a CSRF token, which codes were sent, a mailbox just proven) travels sealed in a cookie of
its own, so no page shown to anyone — a scanner, a bot asking for /signin — writes a row.

Idle and absolute timeouts are checked on every request for both.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

from mailbridge.runtime import Runtime, derive_key
from mailbridge.store.blobs import seal, unseal
from mailbridge.store.models import Account, Member, WebSession
from mailbridge.store.tokens import hash_token
from mailbridge.web.queries import PortalQueries

COOKIE = "mb_session"
ANON_COOKIE = "mb_anon"
MAX_ANON_BYTES = 3000  # a cookie holds 4 KB; anonymous data is a token and a few ids


class ServerSession(CallbackDict, SessionMixin):
    def __init__(self, initial=None, *, row: WebSession | None = None) -> None:
        def on_update(_):
            self.modified = True

        super().__init__(initial or {}, on_update)
        self.row = row
        self.modified = False
        self.new_id: str | None = None  # set when the id must be (re)issued
        self.account: Account | None = row.account if row is not None else None
        self.member: Member | None = row.member if row is not None else None
        self.ended = False
        self.anonymous_since: dt.datetime | None = None  # when the anonymous cookie began
        self.anonymous_seen: dt.datetime | None = None  # when it was last written


class DatabaseSessionInterface(SessionInterface):
    def __init__(self, runtime: Runtime, queries: PortalQueries) -> None:
        self.runtime, self.queries = runtime, queries
        web = runtime.settings.web
        self.idle = dt.timedelta(minutes=web.session_idle_minutes)
        self.absolute = dt.timedelta(hours=web.session_absolute_hours)
        self.secure = runtime.settings.service.base_url.startswith("https://")
        self._anon_key = derive_key(runtime.web_key, "anonymous session")

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        sid = request.cookies.get(COOKIE, "")
        if not sid or len(sid) > 100:
            return self._open_anonymous(request)
        now = self.runtime.clock()
        found = self.queries.session(hash_token(sid))
        if not found:
            return self._open_anonymous(request)
        row = found[0]
        if now - row.last_seen_at > self.idle or now - row.created_at > self.absolute:
            end_session(row, now)
            return ServerSession()
        session = ServerSession(row.data, row=row)
        if now - row.last_seen_at > dt.timedelta(seconds=30):
            # Touch at most every 30 s: enough for a 15-minute idle timeout, fewer writes.
            WebSession.update(last_seen_at=now).where(WebSession.id_hash == row.id_hash).execute()
        return session

    def _open_anonymous(self, request: Request) -> ServerSession:
        raw = request.cookies.get(ANON_COOKIE, "")
        if not raw or len(raw) > 2 * MAX_ANON_BYTES:
            return ServerSession()
        try:
            sealed = base64.urlsafe_b64decode(raw.encode("ascii") + b"==")
            state = json.loads(unseal(self._anon_key, sealed, b"anonymous session"))
            since = dt.datetime.fromisoformat(state["since"])
            seen = dt.datetime.fromisoformat(state["seen"])
            data = dict(state["data"])
        except Exception:  # noqa: BLE001 - forged, truncated or old: start afresh
            return ServerSession()
        now = self.runtime.clock()
        if now - seen > self.idle or now - since > self.absolute:
            return ServerSession()
        session = ServerSession(data)
        session.anonymous_since, session.anonymous_seen = since, seen
        return session

    def _save_anonymous(self, session: ServerSession, response: Response,
                        now: dt.datetime) -> None:
        if not session:
            if session.anonymous_since is not None or session.ended:
                response.delete_cookie(ANON_COOKIE, path="/", secure=self.secure,
                                       httponly=True, samesite="Lax")
            return
        state = {"since": (session.anonymous_since or now).isoformat(),
                 "seen": now.isoformat(), "data": dict(session)}
        sealed = seal(self._anon_key, json.dumps(state).encode(), b"anonymous session")
        value = base64.urlsafe_b64encode(sealed).decode("ascii").rstrip("=")
        if len(value) > 2 * MAX_ANON_BYTES:
            return  # never happens with what the portal stores; refuse rather than break
        response.set_cookie(ANON_COOKIE, value, httponly=True, secure=self.secure,
                            samesite="Lax", path="/")

    def save_session(self, app: Flask, session: ServerSession, response: Response) -> None:
        now = self.runtime.clock()
        if session.account is None and session.member is None:
            if session.ended:
                response.delete_cookie(COOKIE, path="/", secure=self.secure, httponly=True,
                                       samesite="Lax")
            # Anonymous: nothing in the database. Rewritten when changed or rotated (a new
            # seal each time, so a cookie planted earlier never carries a later proof), and
            # at most every 30 s to move the idle timeout on.
            stale = (session.anonymous_seen is not None
                     and now - session.anonymous_seen > dt.timedelta(seconds=30))
            if session.modified or session.new_id is not None or session.ended or stale:
                self._save_anonymous(session, response, now)
            return
        if session.row is None or session.new_id is not None:
            sid = session.new_id or secrets.token_urlsafe(32)
            request_info = _request_info()
            session.row = WebSession.create(
                id_hash=hash_token(sid), account=session.account, member=session.member,
                data=dict(session),
                created_at=now, last_seen_at=now, **request_info)
            response.set_cookie(COOKIE, sid, httponly=True, secure=self.secure,
                                samesite="Lax", path="/")
            response.delete_cookie(ANON_COOKIE, path="/", secure=self.secure, httponly=True,
                                   samesite="Lax")
            session.new_id = None
        elif session.modified:
            (WebSession.update(data=dict(session))
             .where(WebSession.id_hash == session.row.id_hash).execute())


def _request_info() -> dict:
    from flask import request

    return {"ip": request.remote_addr or "",
            "user_agent": request.headers.get("User-Agent", "")[:400]}


def end_session(row: WebSession, now: dt.datetime) -> None:
    WebSession.update(ended_at=now).where(WebSession.id_hash == row.id_hash).execute()


def rotate(session: ServerSession) -> None:
    """A new identity for an anonymous session whose state just gained weight (a mailbox was
    proven): whatever cookie was planted or seen before carries none of it."""
    session.new_id = secrets.token_urlsafe(32)
    session.modified = True


def sign_in(session: ServerSession, account: Account | None, now: dt.datetime) -> None:
    """A new session id for the signed-in account (no session fixation); the anonymous
    session it replaces ends."""
    if session.row is not None:
        end_session(session.row, now)
    session.row = None
    session.account = account
    session.member = None
    session.clear()  # a fresh CSRF token too
    session.new_id = secrets.token_urlsafe(32)


def sign_in_member(session: ServerSession, member: Member, now: dt.datetime) -> None:
    """The same for a staff member: a session is either a recipient's or a member's."""
    sign_in(session, None, now)
    session.member = member


def sign_out(session: ServerSession, now: dt.datetime) -> None:
    if session.row is not None:
        end_session(session.row, now)
    session.clear()
    session.account = None
    session.member = None
    session.row = None
    session.ended = True


def end_all_sessions(account: Account, now: dt.datetime,
                     except_row: WebSession | None = None) -> int:
    query = WebSession.update(ended_at=now).where((WebSession.account == account)
                                                  & WebSession.ended_at.is_null())
    if except_row is not None:
        query = query.where(WebSession.id_hash != except_row.id_hash)
    return query.execute()
