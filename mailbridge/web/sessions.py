"""Server-side portal sessions: the browser holds a random id (HttpOnly, SameSite=Lax), the
database holds its hash, who is signed in, and small per-session data (the CSRF token).

A session row is written only when something is stored in it, so showing a page to a mail
scanner creates nothing. Idle and absolute timeouts are checked on every request; signing
out, a password reset or a revoked account end sessions at once.
"""

from __future__ import annotations

import datetime as dt
import secrets

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

from mailbridge.models import Account, WebSession
from mailbridge.runtime import Runtime
from mailbridge.tokens import hash_token

COOKIE = "mb_session"


class ServerSession(CallbackDict, SessionMixin):
    def __init__(self, initial=None, *, row: WebSession | None = None) -> None:
        def on_update(_):
            self.modified = True

        super().__init__(initial or {}, on_update)
        self.row = row
        self.modified = False
        self.new_id: str | None = None  # set when the id must be (re)issued
        self.account: Account | None = row.account if row is not None else None
        self.ended = False


class DatabaseSessionInterface(SessionInterface):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        web = runtime.settings.web
        self.idle = dt.timedelta(minutes=web.session_idle_minutes)
        self.absolute = dt.timedelta(hours=web.session_absolute_hours)
        self.secure = runtime.settings.service.base_url.startswith("https://")

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        sid = request.cookies.get(COOKIE, "")
        if not sid or len(sid) > 100:
            return ServerSession()
        now = self.runtime.clock()
        row = (WebSession.select().where((WebSession.id_hash == hash_token(sid))
                                         & WebSession.ended_at.is_null()).first())
        if row is None:
            return ServerSession()
        if now - row.last_seen_at > self.idle or now - row.created_at > self.absolute:
            end_session(row, now)
            return ServerSession()
        session = ServerSession(row.data, row=row)
        if now - row.last_seen_at > dt.timedelta(seconds=30):
            # Touch at most every 30 s: enough for a 15-minute idle timeout, fewer writes.
            WebSession.update(last_seen_at=now).where(WebSession.id_hash == row.id_hash).execute()
        return session

    def save_session(self, app: Flask, session: ServerSession, response: Response) -> None:
        now = self.runtime.clock()
        if session.ended and not session:
            response.delete_cookie(COOKIE, path="/", secure=self.secure, httponly=True,
                                   samesite="Lax")
            return
        # Stored after signing out (a "signed out" flash): a new anonymous session, new id.
        if session.row is None and not session.modified and session.new_id is None:
            return  # nothing stored: no row, no cookie
        if session.row is None or session.new_id is not None:
            sid = session.new_id or secrets.token_urlsafe(32)
            request_info = _request_info()
            session.row = WebSession.create(
                id_hash=hash_token(sid), account=session.account, data=dict(session),
                created_at=now, last_seen_at=now, **request_info)
            response.set_cookie(COOKIE, sid, httponly=True, secure=self.secure,
                                samesite="Lax", path="/")
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


def sign_in(session: ServerSession, account: Account, now: dt.datetime) -> None:
    """A new session id for the signed-in account (no session fixation); the anonymous
    session it replaces ends."""
    if session.row is not None:
        end_session(session.row, now)
    session.row = None
    session.account = account
    session.clear()  # a fresh CSRF token too
    session.new_id = secrets.token_urlsafe(32)


def sign_out(session: ServerSession, now: dt.datetime) -> None:
    if session.row is not None:
        end_session(session.row, now)
    session.clear()
    session.account = None
    session.row = None
    session.ended = True


def end_all_sessions(account: Account, now: dt.datetime,
                     except_row: WebSession | None = None) -> int:
    query = WebSession.update(ended_at=now).where((WebSession.account == account)
                                                  & WebSession.ended_at.is_null())
    if except_row is not None:
        query = query.where(WebSession.id_hash != except_row.id_hash)
    return query.execute()
