"""`mailbridge serve` (and `mailbridge worker`): intake (SMTP, and IMAP, LMTP and the MTA's
policy service when enabled), workers with the outbound dispatcher (threads here, or
`[worker] processes` worker processes), scheduler and web portal — each role can be left out —
started in dependency order and stopped in reverse, within `[service] stop_timeout_seconds`:
every part is told at once, finishes the item in hand and hands the rest back."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from waitress.server import create_server

from mailbridge.config import ConfigError
from mailbridge.outbound import outbox
from mailbridge.outbound.dispatcher import Dispatcher
from mailbridge.outbound.mailer import make_mailer
from mailbridge.receive import spool
from mailbridge.receive.imap import ImapPoller
from mailbridge.receive.lmtp import make_lmtp_controller
from mailbridge.receive.policy import PolicyListener
from mailbridge.receive.processes import WorkerProcesses
from mailbridge.receive.smtp import make_controller, make_implicit_tls_controller
from mailbridge.receive.tls import ServerCertificate
from mailbridge.receive.worker import Worker, node_name
from mailbridge.runtime import Runtime
from mailbridge.schedule import build_scheduler
from mailbridge.shares import notify
from mailbridge.store import schema
from mailbridge.web import create_app
from mailbridge.web.body_buffers import BodyBuffers
from mailbridge.web.send_back import largest_request_body

log = logging.getLogger(__name__)

# Open files beyond the portal's connections: database, SMTP clients, spool and documents.
FILES_BESIDES_CONNECTIONS = 256


# A download's bytes are the decrypted document. By default waitress copies what a response
# has written ahead of its client into a temporary file once that passes 1 MB: plaintext
# PHI on disk. Here the thread writing a response waits while it is more than the high
# watermark ahead of the client, so a buffer holds at most that plus one write (a 128 KiB
# record; 1 MiB in blobs of older versions; 256 KiB of a stamped copy), far under the
# overflow: nothing is ever spilled. A slow reader of a large document holds a thread while
# it reads the rest; one that stops reading is cut off after `[web] channel_timeout`.
RESPONSE_BUFFERS = {"outbuf_high_watermark": 1024 * 1024, "outbuf_overflow": 16 * 1024 * 1024}


class Service:
    """The roles this node runs. `processes` > 0 runs the workers (spool worker and outbox
    dispatcher) in that many worker processes, else as threads here; `role` names this
    command's claims ("serve" or "worker"), so the two on one node never resume each other's
    work."""

    def __init__(self, runtime: Runtime, *, web: bool = True, scheduler: bool = True,
                 smtp: bool = True, worker: bool = True, processes: int = 0,
                 role: str = "serve") -> None:
        self.node = node_name(runtime)
        self.processes = (WorkerProcesses(runtime.settings, self.node, processes, role,
                                          metrics=runtime.metrics.workers)
                          if worker and processes > 0 else None)
        if self.processes:  # intake and the portal wake workers in other processes
            runtime = dataclasses.replace(runtime, wake_worker=self.processes.wake_worker,
                                          wake_dispatcher=self.processes.wake_dispatcher)
        self.runtime = runtime
        # Rows claimed by threads of this process go under this name.
        self.claimer = self.node if role == "serve" else f"{self.node}/{role}0"
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mailbridge-smtp")
        settings = runtime.settings
        self.certificate = (ServerCertificate(settings.smtp)
                            if smtp and settings.smtp.tls_cert_file else None)
        self.smtp = make_controller(runtime, self.executor, self.certificate) if smtp else None
        self.smtps = (make_implicit_tls_controller(runtime, self.executor, self.certificate)
                      if self.certificate and settings.smtp.implicit_tls_port else None)
        self.lmtp = (make_lmtp_controller(runtime, self.executor)
                     if smtp and settings.lmtp.enabled else None)
        self.policy = PolicyListener(runtime) if smtp and settings.policy.enabled else None
        threads = worker and not self.processes
        self.worker = Worker(runtime, self.claimer) if threads else None
        self.imap = ImapPoller(runtime) if smtp and settings.imap.enabled else None
        self.dispatcher = (Dispatcher(runtime, make_mailer(settings), node=self.claimer,
                                      on_failure=notify.mail_failed) if threads else None)
        self._jobs_stop = threading.Event()
        self.scheduler = (build_scheduler(runtime, self._jobs_stop, workers=worker)
                          if scheduler else None)
        self.web = None
        self.body_buffers: BodyBuffers | None = None
        if web:
            settings = runtime.settings.web
            app = create_app(runtime.settings, runtime=runtime)
            self.body_buffers = BodyBuffers(settings.body_buffer_dir, os.environ)
            with listener("[web] port", settings.host, settings.port):  # binds here
                # Slow clients wait in waitress's poll loop, not in a thread; poll() rather
                # than select(), which fails beyond 1024 open files. A body larger than the
                # largest upload is refused before it is read.
                self.web = create_server(
                    app, host=settings.host, port=settings.port, threads=settings.threads,
                    connection_limit=settings.connection_limit,
                    channel_timeout=settings.channel_timeout,
                    cleanup_interval=settings.cleanup_interval,
                    max_request_body_size=largest_request_body(runtime.settings),
                    asyncore_use_poll=True, ident="mailbridge", **RESPONSE_BUFFERS)
        try:
            self.metrics_server = self._bind_metrics()
        except ConfigError:
            if self.web:
                self.web.close()
            raise
        self._web_thread: threading.Thread | None = None
        self._metrics_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def _bind_metrics(self):
        """`/metrics` on a listener of its own (loopback by default), bound now like the
        portal's; None when `[metrics] enabled = false`."""
        settings = self.runtime.settings.metrics
        if not settings.enabled:
            return None
        with listener("[metrics] port", settings.host, settings.port):
            return create_server(self.runtime.metrics.wsgi_app(), host=settings.host,
                                 port=settings.port, threads=2, connection_limit=20,
                                 channel_timeout=10, asyncore_use_poll=True, ident="mailbridge")

    def start(self) -> None:
        version = schema.current_version(self.runtime.db)
        if version < schema.LATEST:
            raise ConfigError(f"[database] url: schema version {version} is older than "
                              f"{schema.LATEST}; run `mailbridge db upgrade`")
        self._bind_smtp()
        if self.worker or self.processes:
            # This node's rows from its last run; worker processes resume their own at start.
            spool.recover(self.runtime, self.claimer)
            outbox.recover(self.runtime, self.claimer)
        if self.processes:
            self.processes.start()
        if self.worker:
            self.worker.start()
            self.dispatcher.start()
        if self.scheduler:
            self.scheduler.start()
        if self.web:
            self.body_buffers.open()
            self._web_thread = threading.Thread(target=self._serve_web, name="mailbridge-web",
                                                daemon=True)
            self._web_thread.start()
        if self.imap:
            self.imap.start()
        if self.metrics_server:
            self._metrics_thread = threading.Thread(
                target=self._serve, args=(self.metrics_server,), name="mailbridge-metrics",
                daemon=True)
            self._metrics_thread.start()

    def _bind_smtp(self) -> None:
        """Every listener is bound before anything else starts (the portal's was bound in
        `__init__`), so a port already in use stops the start with nothing running. Mail
        accepted before the worker runs waits in the spool, as after any restart."""
        if self.smtp is None:
            return
        smtp = self.runtime.settings.smtp
        with listener("[smtp] port", smtp.host, smtp.port):
            self.smtp.start()
        started = [self.smtp]
        try:
            if self.smtps:
                with listener("[smtp] implicit_tls_port", smtp.host, smtp.implicit_tls_port):
                    self.smtps.start()
                started.append(self.smtps)
            if self.lmtp:
                lmtp = self.runtime.settings.lmtp
                with listener("[lmtp] socket" if lmtp.socket else "[lmtp] port", lmtp.host,
                               lmtp.port):
                    self.lmtp.start()
                if lmtp.socket:  # the MTA's group may connect, nobody else
                    os.chmod(lmtp.socket, 0o660)
                started.append(self.lmtp)
            if self.policy:
                policy = self.runtime.settings.policy
                with listener("[policy] port", policy.host, policy.port):
                    self.policy.start()
        except BaseException:
            for running in reversed(started):
                running.stop()
            raise

    def _serve_web(self) -> None:
        self._serve(self.web)

    def _serve(self, server) -> None:
        try:
            server.run()
        except OSError:
            # Closing waitress's sockets from another thread can interrupt its select() with
            # EBADF; that is the stop we asked for, not a failure.
            if not self._stopping.is_set():
                raise

    @property
    def smtp_port(self) -> int | None:
        return self.smtp.server.sockets[0].getsockname()[1] if self.smtp else None

    def reload_tls(self) -> bool:
        """Read the SMTP certificate again (SIGHUP); False if it was kept."""
        return self.certificate.reload() if self.certificate else False

    @property
    def web_port(self) -> int | None:
        return self.web.effective_port if self.web else None

    @property
    def metrics_port(self) -> int | None:
        return getattr(self.metrics_server, "effective_port", None)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop accepting, then tell every part to stop at once: each finishes the item in
        hand (a message, an e-mail, a job's batch) and hands the rest back. True if all ended
        within `timeout` (default `[service] stop_timeout_seconds`); work still in hand after
        that is resumed at this node's next start."""
        if timeout is None:
            timeout = self.runtime.settings.service.stop_timeout_seconds
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if self.worker:
            self.worker.signal_stop()
            self.dispatcher.signal_stop()
        if self.processes:
            self.processes.signal_stop()
        self._jobs_stop.set()
        if self.policy:
            self.policy.stop(min(2.0, left()))
        if self.lmtp:
            self.lmtp.stop()
        if self.smtps:
            self.smtps.stop()
        if self.smtp:
            self.smtp.stop()
        ended = True
        if self.imap and not self.imap.stop(left()):
            log.warning("IMAP poller did not finish in time; its messages are taken again at "
                        "start")
            ended = False
        ended &= _within(lambda: self.executor.shutdown(wait=True), left(), "SMTP intake")
        if self.worker and not self.worker.stop(left()):
            log.warning("worker did not finish in time; its message will be resumed at start")
            ended = False
        if self.processes and not self.processes.stop(left()):
            ended = False
        if self.scheduler:
            ended &= _within(lambda: self.scheduler.shutdown(wait=True), left(),
                             "scheduled jobs")
        if self.dispatcher and not self.dispatcher.stop(left()):
            log.warning("dispatcher did not finish in time; its e-mail is sent again at start")
            ended = False
        if self.web:
            self._stopping.set()
            self.web.close()
            if self._web_thread is not None:
                self._web_thread.join(min(2.0, left()))  # keep-alive clients may hold it
            self.body_buffers.close()
        if self.metrics_server:  # last: a scrape during the stop still sees the queues drain
            self._stopping.set()
            self.metrics_server.close()
            if self._metrics_thread is not None:
                self._metrics_thread.join(min(1.0, left()))
        if ended:
            self.runtime.db.close()
        return ended


class listener:
    """Turns "address already in use" while binding into a configuration error naming the
    key to change."""

    def __init__(self, key: str, host: str, port: int) -> None:
        self.key, self.where = key, f"{host}:{port}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EACCES):
            problem = ("is already in use" if exc.errno == errno.EADDRINUSE
                       else "may not be used by this user")
            raise ConfigError(f"{self.key}: {self.where} {problem}") from None
        return False


def _within(wait: Callable[[], object], seconds: float, what: str) -> bool:
    """Run a blocking wait for at most `seconds` (it goes on in the background after)."""
    waiter = threading.Thread(target=wait, name=f"stop {what}", daemon=True)
    waiter.start()
    waiter.join(seconds)
    if waiter.is_alive():
        log.warning("%s did not finish in time; interrupted work is resumed at start", what)
        return False
    return True


def raise_open_file_limit(connection_limit: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard limit so that `[web] connection_limit`
    connections fit. Returns (files allowed now, at most the files wanted; files wanted)."""
    wanted = connection_limit + FILES_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted, wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target, wanted
