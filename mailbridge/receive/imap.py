"""IMAP intake: watch one folder of an existing mailbox; spool each message (committed) and only
then move it to the processed or failed folder, so a crash anywhere loses and doubles nothing.

The path of one message: `ImapPoller.run` → `drain` (fetch by UID with BODY.PEEK[]) →
`imap_intake.take` (member check, source key, `spool.enqueue`) → `move` → the worker runs
`pipeline.process` exactly as for SMTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from imapclient import IMAPClient

from mailbridge.config import read_imap_password
from mailbridge.receive import imap_oauth
from mailbridge.receive import imap_session as session
from mailbridge.receive.imap_intake import Mailbox, Verdict, take, uidvalidity_changed
from mailbridge.runtime import Runtime
from mailbridge.settings import ImapSettings, Settings
from mailbridge.store import db
from mailbridge.store.models import InboundMessage

log = logging.getLogger(__name__)

# RFC 2177: a server may end an IDLE after 30 minutes of silence, so we renew it before.
IDLE_REFRESH_SECONDS = 25 * 60
# How soon a stop request is noticed while waiting for mail.
TICK_SECONDS = 1.0
# One FETCH never asks for more than this many bytes of message bodies (memory bound).
MAX_FETCH_BYTES = 64 * 1024 * 1024


@dataclass
class PassStats:
    """What one or more passes over the folder did; counts only, nothing identifying."""

    counts: dict[Verdict, int] = field(default_factory=dict)
    first_fetch: float | None = None  # time.monotonic() of the first FETCH of a body
    last_spooled: float | None = None

    def add(self, verdict: Verdict) -> None:
        self.counts[verdict] = self.counts.get(verdict, 0) + 1
        if verdict is Verdict.SPOOLED:
            self.last_spooled = time.monotonic()

    def merge(self, other: PassStats) -> None:
        for verdict, n in other.counts.items():
            self.counts[verdict] = self.counts.get(verdict, 0) + n
        if self.first_fetch is None:
            self.first_fetch = other.first_fetch
        self.last_spooled = other.last_spooled or self.last_spooled

    def __getitem__(self, verdict: Verdict) -> int:
        return self.counts.get(verdict, 0)

    @property
    def moved(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        failed = sum(n for v, n in self.counts.items() if v.failed)
        detail = ", ".join(f"{n} {v.value}" for v, n in self.counts.items()
                           if v is not Verdict.SPOOLED and n)
        return (f"{self[Verdict.SPOOLED]} new message(s) spooled, {failed} moved to the failed "
                f"folder" + (f" ({detail})" if detail else ""))


# --- one pass over the folder --------------------------------------------------------------


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _by_bytes(uids: list[int], sizes: dict[int, int]) -> Iterator[list[int]]:
    group: list[int] = []
    total = 0
    for uid in uids:
        if group and total + sizes[uid] > MAX_FETCH_BYTES:
            yield group
            group, total = [], 0
        group.append(uid)
        total += sizes[uid]
    if group:
        yield group


def move(client: IMAPClient, uids: list[int], folder: str) -> None:
    """MOVE when offered; else COPY, flag \\Deleted and expunge just these UIDs (UIDPLUS), or
    the folder's deleted messages when the server cannot expunge by UID."""
    if not uids:
        return
    if client.has_capability("MOVE"):
        client.move(uids, folder)
        return
    client.copy(uids, folder)
    client.delete_messages(uids, silent=True)
    if client.has_capability("UIDPLUS"):
        client.uid_expunge(uids)
    else:
        client.expunge()


def _finish_interrupted_moves(client: IMAPClient, mailbox: Mailbox, uidvalidity: int) -> None:
    """A crash between COPY and EXPUNGE leaves our copied message flagged \\Deleted here."""
    if client.has_capability("MOVE") or not client.has_capability("UIDPLUS"):
        return
    deleted = client.search(["DELETED"])
    ours = [uid for uid in deleted if InboundMessage.get_or_none(
        InboundMessage.source_key == mailbox.key(uidvalidity, uid)) is not None]
    if ours:
        client.uid_expunge(ours)


def drain(runtime: Runtime, client: IMAPClient, folders: session.Folders, mailbox: Mailbox,
          stop: threading.Event | None = None) -> PassStats:
    """One pass: every message now in the folder is spooled (or judged) and then moved."""
    settings = runtime.settings
    uidvalidity = session.select(client, folders.watch)
    check_content = uidvalidity_changed(mailbox, uidvalidity)
    _finish_interrupted_moves(client, mailbox, uidvalidity)
    stats = PassStats()
    uids = sorted(client.search(["UNDELETED"]))
    for batch in _chunks(uids, settings.imap.batch_size):
        if stop is not None and stop.is_set():
            break
        sizes = {uid: int(data[b"RFC822.SIZE"])
                 for uid, data in client.fetch(batch, ["RFC822.SIZE"]).items()}
        processed: list[int] = []
        failed: list[int] = []
        wanted = []
        for uid in batch:
            if uid not in sizes:
                continue  # expunged by someone else meanwhile
            if sizes[uid] > settings.smtp.max_message_bytes:
                stats.add(Verdict.TOO_BIG)
                _count(runtime, Verdict.TOO_BIG)
                failed.append(uid)
            else:
                wanted.append(uid)
        for group in _by_bytes(wanted, sizes):
            if stats.first_fetch is None:
                stats.first_fetch = time.monotonic()
            bodies = client.fetch(group, ["BODY.PEEK[]"])
            for uid in group:
                raw = bodies.get(uid, {}).get(b"BODY[]")
                if raw is None:
                    continue  # gone meanwhile; if it comes back, the next pass takes it
                verdict = take(runtime, raw, mailbox.key(uidvalidity, uid),
                               check_content=check_content)
                stats.add(verdict)
                _count(runtime, verdict)
                (failed if verdict.failed else processed).append(uid)
        # Only now, with every row committed, do the messages leave the folder.
        move(client, processed, folders.processed)
        move(client, failed, folders.failed)
    return stats


# Metrics: a message seen again (ALREADY, REPEAT) is neither accepted nor refused.
REFUSED = {Verdict.NON_MEMBER: "not_a_member", Verdict.TOO_BIG: "too_big",
           Verdict.UNREADABLE: "unreadable"}


def _count(runtime: Runtime, verdict: Verdict) -> None:
    if verdict is Verdict.SPOOLED:
        runtime.metrics.accepted("imap")
    elif verdict in REFUSED:
        runtime.metrics.refused("imap", REFUSED[verdict])


def drain_until_quiet(runtime: Runtime, client: IMAPClient, folders: session.Folders,
                      mailbox: Mailbox, stop: threading.Event | None = None) -> PassStats:
    """Passes until one finds nothing to move (mail that arrived during a pass included)."""
    total = PassStats()
    while stop is None or not stop.is_set():
        stats = drain(runtime, client, folders, mailbox, stop)
        total.merge(stats)
        if stats.moved:
            log.info("imap: %s", stats.summary())
        else:
            break
    return total


def mailbox_of(imap: ImapSettings) -> Mailbox:
    return Mailbox(imap.username, imap.host, imap.folder.strip().strip("/"))


def login(settings: Settings, tokens: imap_oauth.TokenSource | None = None) -> IMAPClient:
    """Logged in with the password, or with a token (`tokens`: kept across reconnects)."""
    if settings.imap.auth == "xoauth2":
        return session.connect(settings.imap, tokens=tokens or imap_oauth.token_source(settings))
    return session.connect(settings.imap, read_imap_password(settings))


def open_session(settings: Settings, tokens: imap_oauth.TokenSource | None = None
                 ) -> tuple[IMAPClient, session.Folders]:
    """Logged in, with the processed and failed folders in place."""
    client = login(settings, tokens)
    try:
        folders = session.resolve_folders(client, settings.imap)
        session.ensure_folders(client, folders)
    except BaseException:
        session.close(client)
        raise
    return client, folders


def poll_once(runtime: Runtime) -> PassStats:
    """`mailbridge imap poll --once`: connect, take everything waiting, log out.
    Raises ImapProblem (plain language) when the mailbox cannot be used."""
    imap = runtime.settings.imap
    try:
        client, folders = open_session(runtime.settings)
    except Exception as exc:
        raise session.explain(exc, imap) from None
    try:
        return drain_until_quiet(runtime, client, folders, mailbox_of(imap))
    except session.ImapProblem:
        raise
    except db.UNAVAILABLE:
        raise
    except Exception as exc:
        raise session.explain(exc, imap) from None
    finally:
        session.close(client)


# --- the long-running poller ---------------------------------------------------------------


class ImapPoller:
    """A thread that keeps the folder empty: IDLE when offered, else a pass every
    `[imap] poll_seconds`; after any error it reconnects with capped exponential back-off."""

    def __init__(self, runtime: Runtime, *, backoff_max: float = 60.0,
                 idle_refresh: float = IDLE_REFRESH_SECONDS) -> None:
        self.runtime = runtime
        self.backoff_max = backoff_max
        self.idle_refresh = idle_refresh
        self.ready = threading.Event()  # connected and the folder drained once
        self.totals = PassStats()  # since start, across reconnects
        self._stop = threading.Event()
        self._outage = False
        self._tokens: imap_oauth.TokenSource | None = None  # one per poller: reused
        self._thread = threading.Thread(target=self.run, name="mailbridge-imap", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish the batch in hand (spooled messages are moved first) and log out."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def run(self) -> None:
        delay = 1.0
        imap = self.runtime.settings.imap
        while not self._stop.is_set():
            client = None
            try:
                if self._tokens is None and imap.auth == "xoauth2":
                    self._tokens = imap_oauth.token_source(self.runtime.settings)
                client, folders = open_session(self.runtime.settings, self._tokens)
                self._serve(client, folders)
            except Exception as exc:
                if self._stop.is_set():
                    break
                if self.ready.is_set():
                    delay = 1.0  # it worked for a while: this is a new outage
                self.ready.clear()
                if not self._outage:
                    # Key and error type only: the full text can name the account.
                    reason = ("database unavailable" if isinstance(exc, db.UNAVAILABLE) else
                              f"connection lost or refused, {session.explain(exc, imap).key}")
                    log.warning("imap: %s (%s); reconnecting with back-off of up to %g s",
                                reason, type(exc).__name__, self.backoff_max)
                    self._outage = True
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max)
            finally:
                if client is not None:
                    session.close(client)
        self.runtime.db.close()

    def _serve(self, client: IMAPClient, folders: session.Folders) -> None:
        """Until stopped; raises on any error so `run` reconnects."""
        imap = self.runtime.settings.imap
        mailbox = mailbox_of(imap)
        if self._outage:
            log.info("imap: reconnected")
            self._outage = False
        self.totals.merge(drain_until_quiet(self.runtime, client, folders, mailbox, self._stop))
        if not self.ready.is_set():
            self.ready.set()
            log.info("imap: watching the mailbox folder (%s)",
                     "IDLE" if client.has_capability("IDLE") else
                     f"polled every {imap.poll_seconds:g} s")
        while not self._stop.is_set():
            if client.has_capability("IDLE"):
                # A notification lost in a race with the last pass costs at most poll_seconds.
                self._idle(client, min(self.idle_refresh, imap.poll_seconds))
            else:
                self._stop.wait(imap.poll_seconds)
            if self._stop.is_set():
                return
            self.totals.merge(drain_until_quiet(self.runtime, client, folders, mailbox,
                                                self._stop))

    def _idle(self, client: IMAPClient, longest: float) -> None:
        """Return when new mail is announced, after `longest` seconds, or on stop."""
        client.idle()
        started = time.monotonic()
        try:
            while not self._stop.is_set() and time.monotonic() - started < longest:
                checked = time.monotonic()
                responses = client.idle_check(timeout=TICK_SECONDS)
                if any(r and r[0] == b"BYE" for r in responses):
                    raise ConnectionError("the server ended the session")
                if any(len(r) > 1 and r[1] == b"EXISTS" for r in responses):
                    return
                if not responses and time.monotonic() - checked < TICK_SECONDS / 2:
                    return  # readable but empty: the connection closed; DONE will tell
        finally:
            client.idle_done()


# --- the operator's check ------------------------------------------------------------------


@dataclass(frozen=True)
class CheckReport:
    capabilities: tuple[str, ...]
    folders: session.Folders
    waiting: int
    created: tuple[str, ...]
    warnings: tuple[str, ...]


def check(settings: Settings) -> CheckReport:
    """`mailbridge imap check`: log in, look at the folders, create the processed and failed
    folders if missing. Raises ImapProblem (plain language, naming the key)."""
    imap = settings.imap
    try:
        client = login(settings)
    except Exception as exc:
        raise session.explain(exc, imap) from None
    try:
        capabilities = tuple(sorted(c.decode() for c in client.capabilities()))
        folders = session.resolve_folders(client, imap)
        if not client.folder_exists(folders.watch):
            names = sorted(str(name) for _, _, name in client.list_folders())[:20]
            raise session.ImapProblem("[imap] folder", f"the mailbox has no folder "
                                      f"{folders.watch!r}; it has: {', '.join(names)}")
        waiting = int(client.folder_status(folders.watch, [b"MESSAGES"])[b"MESSAGES"])
        created = tuple(session.ensure_folders(client, folders))
    except Exception as exc:
        raise session.explain(exc, imap) from None
    finally:
        session.close(client)
    warnings = []
    if "IDLE" not in capabilities:
        warnings.append(f"the server does not offer IDLE: new mail is picked up every "
                        f"{imap.poll_seconds:g} s ([imap] poll_seconds)")
    if "MOVE" not in capabilities and "UIDPLUS" not in capabilities:
        warnings.append("the server offers neither MOVE nor UIDPLUS: moving a message out "
                        "also expunges messages others flagged \\Deleted in the folder")
    if imap.security == "none" and imap.host not in ("127.0.0.1", "::1", "localhost"):
        secret = "the token" if imap.auth == "xoauth2" else "the password"
        warnings.append(f"[imap] security = \"none\": {secret} and the mail cross the "
                        "network unencrypted")
    return CheckReport(capabilities, folders, waiting, created, tuple(warnings))
