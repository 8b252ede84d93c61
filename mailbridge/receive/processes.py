"""Worker processes (`[worker] processes`): each a spawned Python process with its own runtime
and database connections, running the spool worker and the outbox dispatcher, woken through a
pipe; the parent restarts one that dies and stops them all within the stop timeout. Each sends
its counters to the parent every second over a pipe of its own, for the parent's /metrics, and
the start and end of an outage, which the parent logs once for the node."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import faulthandler
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time

from mailbridge.logs import configure_logging
from mailbridge.metrics import WorkerSamples
from mailbridge.outbound import outbox
from mailbridge.outbound.dispatcher import Dispatcher
from mailbridge.outbound.mailer import make_mailer
from mailbridge.receive import spool
from mailbridge.receive.worker import Worker
from mailbridge.runtime import build_runtime
from mailbridge.settings import Settings
from mailbridge.shares import notify
from mailbridge.store.outages import OutageBoard

log = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")  # no fork: no copied locks, threads or sockets
RESTART_DELAY_SECONDS = 1.0
RESTART_DELAY_MAX_SECONDS = 30.0
PR_SET_PDEATHSIG = 1
WAKE_WORKER, WAKE_DISPATCHER = b"w", b"d"
METRICS_EVERY_SECONDS = 1.0
OUTAGE = "outage"  # first item of an outage announcement on the pipe to the parent


def claim_id(node: str, role: str, index: int) -> str:
    """The name a worker process claims rows under. Each process has its own, so a restarted
    process resumes exactly what its dead predecessor held, never a live sibling's rows."""
    return f"{node}/{role}{index}"


class Fanout(threading.Event):
    """The parent's `wake_worker` / `wake_dispatcher`: `set()` also writes `code` to every
    worker process's wake pipe. A pipe, not a shared lock: a process killed at any moment
    cannot leave the others waiting on something it held."""

    def __init__(self, code: bytes, writers: dict, lock: threading.Lock) -> None:
        super().__init__()
        self.code, self.writers, self.lock = code, writers, lock

    def set(self) -> None:
        super().set()
        with self.lock:  # a pipe being replaced is never written to after its close
            for writer in self.writers.values():
                with contextlib.suppress(OSError):  # full (already woken), or its reader died
                    os.write(writer.fileno(), self.code)


class WorkerProcesses:
    """`count` worker processes of one node, woken by intake and the portal in the parent
    through `wake_worker` and `wake_dispatcher`, stopped by SIGTERM."""

    def __init__(self, settings: Settings, node: str, count: int, role: str = "serve",
                 metrics: WorkerSamples | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else WorkerSamples()
        self.outages = OutageBoard()  # one warning per outage for all the processes
        self._runs = 0  # each process started, for `metrics`: a restart is a new run
        self.ids = [claim_id(node, role, i + 1) for i in range(count)]
        self._writers: dict = {}  # process number: write end (Connection) of its wake pipe
        self._lock = threading.Lock()
        self.wake_worker = Fanout(WAKE_WORKER, self._writers, self._lock)
        self.wake_dispatcher = Fanout(WAKE_DISPATCHER, self._writers, self._lock)
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self._procs: list = [None] * count
        self._started_at = [0.0] * count
        self._delay = [RESTART_DELAY_SECONDS] * count
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        for i in range(len(self.ids)):
            self._spawn(i)
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name="mailbridge-workers")
        self._supervisor.start()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.pid]

    def _spawn(self, i: int) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            reader, writer = SPAWN.Pipe(duplex=False)
            samples_in, samples_out = SPAWN.Pipe(duplex=False)
            proc = SPAWN.Process(target=run, name=f"mailbridge-worker-{i + 1}", daemon=False,
                                 args=(self.settings, self.ids[i], reader, os.getpid(),
                                       samples_out))
            # A SIGUSR1 (stacks, see `run`) that reaches the child before it is ready would
            # end it: it starts with the signal blocked, so one sent early waits for it.
            unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            reader.close()  # the child has its own copies now
            samples_out.close()
            self._runs += 1
            threading.Thread(target=_collect_samples, args=(samples_in, self.metrics,
                                                            self.outages, (i, self._runs)),
                             daemon=True, name=f"mailbridge-worker-{i + 1}-metrics").start()
            os.set_blocking(writer.fileno(), False)
            old = self._writers.pop(i, None)
            if old is not None:
                old.close()
            self._writers[i] = writer
            self._procs[i] = proc
            self._started_at[i] = time.monotonic()

    def _supervise(self) -> None:
        """Restart a process that died (a crash, the OOM killer), after a delay that doubles
        while it keeps dying within a minute of its start."""
        while not self._stopping.wait(0.5):
            for i, proc in enumerate(self._procs):
                if self._stopping.is_set() or proc is None or proc.is_alive():
                    continue
                lived = time.monotonic() - self._started_at[i]
                self._delay[i] = (RESTART_DELAY_SECONDS if lived > 60
                                  else min(self._delay[i] * 2, RESTART_DELAY_MAX_SECONDS))
                log.warning("worker process %d ended (exit status %s); restarting it in %g s",
                            i + 1, proc.exitcode, self._delay[i])
                if not self._stopping.wait(self._delay[i]):
                    self._spawn(i)
        # Processes started here die with this thread (PR_SET_PDEATHSIG follows the thread
        # that started them): it ends only once `stop` has seen them all end. (It does not
        # join them itself: two threads reaping one process make one of them think it runs.)
        self._ended.wait()

    def signal_stop(self) -> None:
        """Every process finishes the item in hand and hands the rest back."""
        with self._lock:
            self._stopping.set()
            for proc in self._procs:
                if proc is not None and proc.is_alive():
                    proc.terminate()  # SIGTERM: the worker process's graceful stop

    def stop(self, timeout: float) -> bool:
        """True if every process ended within `timeout`; the others are killed (what they
        held is resumed by the same process number at the next start)."""
        self.signal_stop()
        deadline = time.monotonic() + timeout
        ended = True
        for i, proc in enumerate(self._procs):
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker process %d did not finish in time; killed (its work is "
                            "resumed at start)", i + 1)
                proc.kill()
                proc.join(2)
                ended = False
        self._ended.set()
        return ended


def run(settings: Settings, claimer: str, wakes, parent_pid: int, samples=None) -> None:
    """A worker process: the spool worker and the outbox dispatcher as threads, until SIGTERM
    (from the parent, or from systemd to every process of the service). If the parent dies,
    this process dies with it, as on a machine going down."""
    _die_with_parent(parent_pid)
    os.umask(0o077)
    configure_logging(settings.service.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which decides
    # `systemctl kill -s USR1` reaches every process of the service: each prints its stacks.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})  # blocked by the parent
    to_parent = ToParent(samples) if samples is not None else None
    runtime = build_runtime(settings)
    if to_parent is not None:
        runtime = dataclasses.replace(runtime, announce_outage=to_parent.outage)
    threading.Thread(target=_relay_wakes, args=(wakes, runtime), daemon=True,
                     name="wake-relay").start()
    spool.recover(runtime, claimer)
    outbox.recover(runtime, claimer)
    worker = Worker(runtime, claimer)
    dispatcher = Dispatcher(runtime, make_mailer(settings), node=claimer,
                            on_failure=notify.mail_failed,
                            out=lambda line: print(line, flush=True))
    # Until here a SIGTERM ends the process at once (nothing is in hand yet); from here on
    # it is a graceful stop.
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    signal.signal(signal.SIGTERM, lambda signum, frame: signals.put(signum))
    stop_sending = threading.Event()
    sender = threading.Thread(target=_send_samples, args=(to_parent, runtime, stop_sending),
                              daemon=True, name="metrics-sender")
    sender.start()
    worker.start()
    dispatcher.start()
    while True:
        with contextlib.suppress(queue.Empty):
            signals.get(timeout=0.5)
            break
        if os.getppid() != parent_pid:  # no PR_SET_PDEATHSIG here
            os._exit(1)
    timeout = settings.service.stop_timeout_seconds
    deadline = time.monotonic() + timeout
    worker.signal_stop()
    dispatcher.signal_stop()
    worker.stop(timeout)
    dispatcher.stop(max(0.0, deadline - time.monotonic()))
    stop_sending.set()  # and it sends the final counts
    sender.join(2)
    runtime.db.close()


class ToParent:
    """A worker process's end of its pipe to the parent, shared by the threads that send on
    it (the counters every second; an outage's start and end as it happens)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.lock = threading.Lock()  # one process's threads only: a pipe write is not atomic

    def send(self, item: object) -> bool:
        """False once the parent is gone (or the pipe was closed)."""
        with self.lock:
            try:
                self.conn.send(item)
            except (OSError, ValueError):
                return False
            return True

    def outage(self, logger: str, part: str, cause: str, max_seconds: float) -> None:
        self.send((OUTAGE, logger, part, cause, max_seconds))

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def _send_samples(to_parent: ToParent | None, runtime, stop: threading.Event) -> None:
    """Every second, and once more at the stop: this process's counters to the parent."""
    if to_parent is None:
        return
    while True:
        stopping = stop.wait(METRICS_EVERY_SECONDS)
        if not to_parent.send(runtime.metrics.snapshot()):  # the parent is gone
            return
        if stopping:
            to_parent.close()
            return


def _collect_samples(samples, metrics: WorkerSamples, outages: OutageBoard,
                     source: object) -> None:
    """The parent's side: keep the latest snapshot of one run of a worker process, and log
    the outages it announces (once for the node); when it ends (its pipe closes, whatever
    killed it) its last counts are kept as ended and it leaves any outage it was in."""
    try:
        while True:
            try:
                item = samples.recv()
            except (EOFError, OSError):
                return
            if isinstance(item, tuple) and item and item[0] == OUTAGE:
                outages.announce(source, *item[1:])
            else:
                metrics.update(source, item)
    finally:
        metrics.ended(source)
        outages.gone(source)
        samples.close()


def _relay_wakes(wakes, runtime) -> None:
    """Bytes from the parent's wake pipe become this process's own wake events."""
    fd = wakes.fileno()
    while True:
        try:
            data = os.read(fd, 512)
        except OSError:
            return
        if not data:  # the parent is gone
            return
        if WAKE_WORKER in data:
            runtime.wake_worker.set()
        if WAKE_DISPATCHER in data:
            runtime.wake_dispatcher.set()


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)
