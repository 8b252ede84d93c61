"""What the service counts and measures, for Prometheus (`/metrics` on a listener of its own,
never the public portal).

One `Metrics` per runtime, with a `CollectorRegistry` of its own: nothing here is global, so
two services in one process (tests) never mix their counts. Counters and histograms live in
the process that does the work (intake, worker, dispatcher, jobs, portal); worker processes
send snapshots of theirs to the parent (`WorkerSamples`), which adds them in at scrape time.
The spool and outbox gauges are read from the database at scrape time, so they are the same on
every node.

Every label value comes from a fixed set (channels, refusal reasons, mail kinds, job names,
Flask endpoint names, HTTP status codes): never an address, a token, a file name or anything
else a sender or visitor chooses, so no label carries PHI and nobody outside can make the
number of series grow. A value outside its set is counted as "other".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator

import peewee
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from mailbridge.clock import Clock
from mailbridge.store.db import UNAVAILABLE
from mailbridge.store.models import InboundMessage, OutboundMessage
from mailbridge.store.states import Inbound, Mail, Outbound

log = logging.getLogger(__name__)

PATH = "/metrics"
OTHER = "other"

# Why intake refused a message, per channel. SMTP counts its refusing replies (a refused
# recipient is one refusal, as is each command refused before STARTTLS).
REFUSALS = {
    "smtp": ("not_a_member", "no_such_address", "too_big", "over_budget",
             "database_unavailable", "disk_full", "tls_required"),
    "imap": ("not_a_member", "too_big", "unreadable"),
    "lmtp": ("not_a_member", "no_such_address", "too_big", "over_budget",
             "database_unavailable", "disk_full"),
}
DELIVERY_RESULTS = ("sent", "retried", "failed")
MAIL_KINDS = tuple(kind.value for kind in Mail)

# Rows that are still work, or wait for the operator. Finished rows (done, ignored, rejected,
# sent) only grow; counting them at every scrape would read the whole history, and the
# intake and delivery counters tell their rate anyway.
SPOOL_STATES = (Inbound.QUEUED, Inbound.PROCESSING, Inbound.FAILED)
OUTBOX_STATES = (Outbound.QUEUED, Outbound.SENDING, Outbound.FAILED)

JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


def _one_of(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


class Metrics:
    """The service's counters and histograms, and the queue gauges read at scrape time."""

    def __init__(self, db: peewee.Database, clock: Clock) -> None:
        # This process's own counters and histograms; `registry` (what /metrics shows) adds
        # those of its worker processes to them, and the queue gauges.
        self.own = CollectorRegistry(auto_describe=True)
        self.workers = WorkerSamples()
        r = self.own
        self.intake_accepted = Counter(
            "mailbridge_intake_accepted", "Messages accepted (spooled and committed) at intake.",
            ["channel"], registry=r)
        self.intake_refused = Counter(
            "mailbridge_intake_refused", "Messages (SMTP: replies) refused at intake, by reason.",
            ["channel", "reason"], registry=r)
        self.shares_created = Counter(
            "mailbridge_shares_created", "Shares created (duplicates of a share not counted).",
            registry=r)
        self.outbound_sent = Counter(
            "mailbridge_outbound_sent", "E-mails the relay (or Maildir) accepted, by kind.",
            ["kind"], registry=r)
        self.outbound_retries = Counter(
            "mailbridge_outbound_retries", "Sending attempts that will be tried again, by kind.",
            ["kind"], registry=r)
        self.outbound_failures = Counter(
            "mailbridge_outbound_failures", "E-mails given up on, by kind.", ["kind"],
            registry=r)
        self.job_duration = Histogram(
            "mailbridge_job_duration_seconds", "Scheduled job runs and how long they took.",
            ["job"], buckets=JOB_BUCKETS, registry=r)
        self.job_failures = Counter(
            "mailbridge_job_failures", "Scheduled job runs that failed (database or storage "
            "outage, or an error).", ["job"], registry=r)
        self.portal_requests = Counter(
            "mailbridge_portal_requests", "Portal requests by route (endpoint) and status.",
            ["route", "status"], registry=r)
        self.portal_duration = Histogram(
            "mailbridge_portal_request_duration_seconds",
            "Portal time until the response starts, by route (endpoint).", ["route"],
            registry=r)
        self._deliveries = {"sent": self.outbound_sent, "retried": self.outbound_retries,
                            "failed": self.outbound_failures}
        # Every known series exists from the start (at 0), so rate() sees the first event.
        for channel, reasons in REFUSALS.items():
            self.intake_accepted.labels(channel)
            for reason in reasons:
                self.intake_refused.labels(channel, reason)
        for counter in self._deliveries.values():
            for kind in MAIL_KINDS:
                counter.labels(kind)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(MergedCollector(self.own, self.workers))
        self.registry.register(QueueCollector(db, clock))

    # --- what the parts call -------------------------------------------------------------

    def accepted(self, channel: str) -> None:
        self.intake_accepted.labels(_one_of(channel, REFUSALS)).inc()

    def refused(self, channel: str, reason: str) -> None:
        channel = _one_of(channel, REFUSALS)
        self.intake_refused.labels(channel, _one_of(reason, REFUSALS.get(channel, ()))).inc()

    def share_created(self) -> None:
        self.shares_created.inc()

    def delivered(self, kind: str, result: str) -> None:
        """`result` as the dispatcher counts it: sent, retried or failed."""
        counter = self._deliveries.get(result)
        if counter is not None:
            counter.labels(_one_of(kind, MAIL_KINDS)).inc()

    def job_ran(self, job: str, seconds: float, *, failed: bool) -> None:
        self.job_duration.labels(job).observe(seconds)
        if failed:
            self.job_failures.labels(job).inc()

    def request_served(self, route: str, status: int, seconds: float) -> None:
        """`route` is a Flask endpoint name (never the URL: link URLs carry tokens)."""
        code = str(status) if 100 <= status <= 599 else OTHER
        self.portal_requests.labels(route, code).inc()
        self.portal_duration.labels(route).observe(seconds)

    def snapshot(self) -> Samples:
        """This process's counter and histogram samples, for the parent of a worker process."""
        return snapshot(self.own)

    def wsgi_app(self):
        """The exposition at `/metrics` (gzip when asked); anything else is 404."""
        exposition = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") != PATH:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found; metrics are at /metrics\n"]
            return exposition(environ, start_response)

        return app


# {(family name, sample name, sorted labels): value}: what a worker process sends its parent.
Samples = dict[tuple[str, str, tuple[tuple[str, str], ...]], float]


def snapshot(registry: CollectorRegistry) -> Samples:
    """The samples of `registry`'s counters and histograms, without `_created` (a time, not
    an amount: it does not add up across processes)."""
    return {(family.name, sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect() if family.type in ("counter", "histogram")
            for sample in family.samples if not sample.name.endswith("_created")}


class WorkerSamples:
    """The latest snapshot of each running worker process, and the sum of the last snapshots
    of those that ended (stopped, crashed, killed): a restarted process starts again at 0, and
    the node's counters must not go back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[object, Samples] = {}
        self._ended: Samples = {}

    def update(self, source: object, samples: Samples) -> None:
        """`source` names one run of one process (a restart is a new source)."""
        with self._lock:
            self._running[source] = dict(samples)

    def ended(self, source: object) -> None:
        with self._lock:
            for key, value in self._running.pop(source, {}).items():
                self._ended[key] = self._ended.get(key, 0.0) + value

    def totals(self) -> Samples:
        with self._lock:
            found = dict(self._ended)
            for samples in self._running.values():
                for key, value in samples.items():
                    found[key] = found.get(key, 0.0) + value
        return found


class MergedCollector(Collector):
    """This process's counters and histograms with the worker processes' added in, sample by
    sample. Only families this process has are shown, so a worker process cannot add one."""

    def __init__(self, own: CollectorRegistry, workers: WorkerSamples) -> None:
        self.own, self.workers = own, workers

    def describe(self) -> Iterator[Metric]:
        yield from self.own.collect()

    def collect(self) -> Iterator[Metric]:
        yield from merge(self.own.collect(), self.workers.totals())


def merge(families: Iterable[Metric], others: Samples) -> Iterator[Metric]:
    """`families` with the values of `others` added to theirs; a series only `others` has is
    added after the family's own (in the order it came)."""
    extra: dict[str, list] = {}
    for (family, name, labels), value in others.items():
        extra.setdefault(family, []).append(((name, labels), value))
    for family in families:
        more = dict(extra.get(family.name, ()))
        merged = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            merged.samples.append(sample._replace(value=sample.value + more.pop(key, 0.0)))
        for (name, labels), value in more.items():
            merged.add_sample(name, dict(labels), value)
        yield merged


class QueueCollector(Collector):
    """Spool and outbox depth and oldest age by state, read from the database at each scrape:
    true for the whole cluster whichever node does the work. When the database cannot be read
    the scrape still answers, with `mailbridge_database_up 0` and no queue figures."""

    def __init__(self, db: peewee.Database, clock: Clock) -> None:
        self.db, self.clock = db, clock

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not query a database that may not be there yet.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        up, rest = families[0], families[1:]
        try:
            now = self.clock()
            spool = _by_state(InboundMessage, InboundMessage.received_at, SPOOL_STATES, now)
            outbox = _by_state(OutboundMessage, OutboundMessage.created_at, OUTBOX_STATES, now)
        except UNAVAILABLE as exc:
            log.warning("metrics: the database did not answer (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        finally:
            self.db.close()  # scrapes come every few seconds, from a pool of threads
        up.add_metric([], 1)
        yield up
        spool_depth, spool_age, outbox_depth, outbox_age = rest
        for (depth, age), rows in (((spool_depth, spool_age), spool),
                                   ((outbox_depth, outbox_age), outbox)):
            for state, (count, oldest) in rows.items():
                depth.add_metric([state], count)
                age.add_metric([state], oldest)
            yield depth
            yield age

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("mailbridge_database_up",
                              "1 if the database answered this scrape, else 0."),
            GaugeMetricFamily("mailbridge_spool_messages",
                              "Inbound messages in the spool, by state (all nodes).",
                              labels=["state"]),
            GaugeMetricFamily("mailbridge_spool_oldest_age_seconds",
                              "Age of the oldest inbound message in each state (0: none).",
                              labels=["state"]),
            GaugeMetricFamily("mailbridge_outbox_messages",
                              "E-mails in the outbox, by state (all nodes).", labels=["state"]),
            GaugeMetricFamily("mailbridge_outbox_oldest_age_seconds",
                              "Age of the oldest e-mail in each state (0: none).",
                              labels=["state"]),
        ]


def _by_state(model, since, states, now) -> dict[str, tuple[int, float]]:
    """{state: (rows, age in seconds of the oldest)} for every state in `states`."""
    found = {str(state): (0, 0.0) for state in states}
    query = (model.select(model.state, peewee.fn.COUNT(model.id), peewee.fn.MIN(since))
             .where(model.state.in_([str(s) for s in states])).group_by(model.state))
    for state, count, oldest in query.tuples():
        if isinstance(oldest, str):  # SQLite hands back text for an aggregate
            oldest = since.python_value(oldest)
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        found[state] = (int(count), age)
    return found
