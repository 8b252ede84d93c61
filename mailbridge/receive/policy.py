"""The policy service for an MTA in front (Postfix `check_policy_service`): at RCPT it tells
the MTA to refuse what mailbridge would refuse — an address in our domains that does not
exist, mail to the sharing or a reply address from a sender who is not an active member, a
client past its hourly budget — so the MTA answers its own client and never has to bounce
(backscatter). Other domains the MTA serves get DUNNO.

Only the envelope is known at RCPT: the member check reads the envelope sender. A member whose
provider rewrites it (SRS, some list and forwarding services) is refused here although their
From would be accepted; mailbridge's own check after DATA still reads the header From."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from mailbridge.mail import senders
from mailbridge.mail.route import Route, classify_address
from mailbridge.receive import limits
from mailbridge.receive.policy_protocol import PolicyServer
from mailbridge.runtime import Runtime
from mailbridge.shares import members
from mailbridge.store import db

log = logging.getLogger(__name__)

DUNNO = "DUNNO"
NO_SUCH_ADDRESS = "REJECT 5.1.1 No such address here"
NOT_A_MEMBER = "REJECT 5.7.1 Sender is not allowed to share through this service"
UNAVAILABLE = "DEFER_IF_PERMIT 4.3.0 Temporary failure, please try again later"
OVER_BUDGET = ("DEFER_IF_PERMIT 4.7.1 Too much mail from you in the last hour, please try "
               "again later")
WINDOW_SECONDS = 3600.0
MAX_CLIENTS = 100_000  # clients remembered at once; the oldest hour is dropped beyond that


class ClientBudget:
    """Messages and bytes per client address in the last hour, in memory: the spool only
    knows the MTA's own address for mail it relayed, so the clients behind it are counted
    here (from zero again after a restart)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._seen: dict[str, collections.OrderedDict[str, tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def over(self, client: str, instance: str, size: int, now: float) -> bool:
        """Would this message (`instance`, Postfix's id for it) take the client past a budget?
        A message already counted (its next recipient) is never refused halfway."""
        if not self.max_messages and not self.max_bytes:
            return False
        with self._lock:
            seen = self._seen.setdefault(client, collections.OrderedDict())
            while seen and next(iter(seen.values()))[0] < now - WINDOW_SECONDS:
                seen.popitem(last=False)
            if instance in seen:
                return False
            count, total = len(seen), sum(s for _, s in seen.values())
            if (self.max_messages and count + 1 > self.max_messages) or (
                    self.max_bytes and total + size > self.max_bytes):
                return True
            seen[instance] = (now, size)
            if len(self._seen) > MAX_CLIENTS:
                self._forget_quiet(now)
            return False

    def _forget_quiet(self, now: float) -> None:
        for client in [c for c, s in self._seen.items()
                       if not s or next(reversed(s.values()))[0] < now - WINDOW_SECONDS]:
            del self._seen[client]


class PolicyDecider:
    """`decide(request) -> action` for the policy protocol server; runs in a thread pool."""

    def __init__(self, runtime: Runtime, clock=time.monotonic) -> None:
        self.runtime = runtime
        smtp = runtime.settings.smtp
        self.budget = ClientBudget(smtp.max_messages_per_hour_per_ip,
                                   smtp.max_bytes_per_hour_per_ip)
        self.clock = clock

    def __call__(self, request: dict[str, str]) -> str:
        if request.get("protocol_state", "RCPT") != "RCPT":
            return DUNNO  # only recipients are judged here; DATA is mailbridge's own
        settings = self.runtime.settings
        recipient = request.get("recipient", "")
        route = classify_address(recipient, settings)
        if route is None:
            # An MX serving other domains too: their mail is none of our business.
            domain = recipient.rpartition("@")[2].lower()
            ours = {d.lower() for d in settings.own_domains}
            return NO_SUCH_ADDRESS if domain in ours else DUNNO
        sender = request.get("sender", "").strip()
        client = request.get("client_address", "")
        size = int(request["size"]) if request.get("size", "").isdigit() else 0
        try:
            if route in (Route.SHARE, Route.REPLY) and members.find_active(sender) is None:
                log.info("policy: refused a non-member's message at RCPT")
                return NOT_A_MEMBER
            if sender and limits.over_budget(self.runtime, client_ip="", sender=sender,
                                             ip_exempt=True, incoming_bytes=size):
                return OVER_BUDGET
        except db.UNAVAILABLE:
            log.warning("policy: database unavailable; answered DEFER_IF_PERMIT")
            return UNAVAILABLE
        exempt = not client or senders.headers_trusted("smtp", client, settings)
        if not exempt and self.budget.over(client, request.get("instance", ""), size,
                                           self.clock()):
            log.info("policy: a client is over its hourly budget; answered DEFER_IF_PERMIT")
            return OVER_BUDGET
        return DUNNO


class PolicyListener:
    """The policy server on its own event loop thread, for `serve` and `mailbridge policy`."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings.policy
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mailbridge-policy")
        self.server = PolicyServer(settings.host, settings.port, PolicyDecider(runtime),
                                   executor=self.executor)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="mailbridge-policy", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        """Binds now (an address in use raises here, before anything else starts)."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self.executor.shutdown(wait=False)
            raise

    def stop(self, timeout: float) -> bool:
        if not self._thread.is_alive():
            return True
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout)
        except TimeoutError:
            return False
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self.executor.shutdown(wait=False, cancel_futures=True)
        return True
