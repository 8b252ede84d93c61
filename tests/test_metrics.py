"""`/metrics` scraped over HTTP from the running service: the counters and the queue gauges move
with what really happens (SMTP intake, shares, sends, jobs, portal requests), nothing in the
scrape names a person or carries a token, the listener is on loopback by default, a
database outage makes the scrape say so instead of failing, and the counts of worker processes
are in their parent's scrape (kept when one is killed and restarted)."""

from __future__ import annotations

import http.client
import os
import re
import secrets
import signal
import smtplib
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailbridge.config import ConfigError
from mailbridge.metrics import Metrics
from tests.conftest import make_settings, start_service
from tests.faults.harness import Postgres, Sender, Site, delivered, settled, wait_until
from tests.helpers import MEMBER, add_jane, share_message
from tests.smtp_sink import SmtpSink

LINK = re.compile(rb"http://portal\.example/s/([A-Za-z0-9_-]{43})")
REFUSED_RECIPIENT = "bounced@ortho.example"


def scrape(port: int) -> tuple[str, dict]:
    """The exposition text and {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def fetch(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def link_tokens(sink) -> list[str]:
    found = []
    for received in sink.messages:
        for part in received.message.walk():
            if not part.is_multipart():
                found += [m.decode() for m in LINK.findall(part.get_payload(decode=True) or b"")]
    return found


def test_a_scrape_during_a_run_counts_what_happened_and_names_no_one(service):
    port = service.service.metrics_port
    _, before = scrape(port)
    assert value(before, "mailbridge_database_up") == 1
    assert value(before, "mailbridge_intake_accepted_total", channel="smtp") == 0
    assert value(before, "mailbridge_outbox_messages", state="queued") == 0

    add_jane()
    service.sink.refuse.add(REFUSED_RECIPIENT)  # the relay refuses one link for good
    service.sink.tempfail_left = 1  # and answers 451 once: one retry
    service.send(share_message(recipients=["dr.smith@ortho.example", REFUSED_RECIPIENT],
                               subject="POC Rose Taylor"))
    with pytest.raises(smtplib.SMTPDataError) as refused:  # a stranger: 550 after the header
        service.send(share_message(sender="stranger@elsewhere.example"), sign=False)
    assert refused.value.smtp_code == 550
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        service.send(share_message(), rcpts=["nobody@portal.example"])
    service.drain(timeout=20)

    [token] = set(link_tokens(service.sink))  # in the text and the HTML part
    forged = secrets.token_urlsafe(32)
    web = service.service.web_port
    assert fetch(web, f"/s/{token}") == 200
    assert fetch(web, f"/s/{forged}") == 404
    assert fetch(web, f"/no-such-page-{forged}") == 404
    assert fetch(web, "/healthz") == 200

    text, after = scrape(port)
    assert value(after, "mailbridge_intake_accepted_total", channel="smtp") == 1
    assert value(after, "mailbridge_intake_refused_total", channel="smtp",
                 reason="not_a_member") == 1
    assert value(after, "mailbridge_intake_refused_total", channel="smtp",
                 reason="no_such_address") == 1
    assert value(after, "mailbridge_shares_created_total") == 1
    assert value(after, "mailbridge_outbound_sent_total", kind="link") == 1
    assert value(after, "mailbridge_outbound_sent_total", kind="receipt") == 1
    assert value(after, "mailbridge_outbound_failures_total", kind="link") == 1
    assert total(after, "mailbridge_outbound_retries_total") == 1
    # The refused link waits for the operator: the cluster-wide gauge shows it.
    assert value(after, "mailbridge_outbox_messages", state="failed") == 1
    assert value(after, "mailbridge_outbox_oldest_age_seconds", state="failed") >= 0
    assert value(after, "mailbridge_outbox_messages", state="queued") == 0
    # Routes are endpoint names; a URL nobody routes is "unmatched", whatever it was.
    assert value(after, "mailbridge_portal_requests_total", route="links.link_page",
                 status="200") == 1
    assert value(after, "mailbridge_portal_requests_total", route="links.link_page",
                 status="404") == 1
    assert value(after, "mailbridge_portal_requests_total", route="unmatched",
                 status="404") == 1
    assert value(after, "mailbridge_portal_requests_total", route="healthz", status="200") == 1
    assert value(after, "mailbridge_portal_request_duration_seconds_count",
                 route="links.link_page") == 2
    # The scheduler ran its jobs at start.
    assert value(after, "mailbridge_job_duration_seconds_count", job="expire") >= 1
    assert value(after, "mailbridge_job_failures_total", job="expire") is None

    # Nothing that names a person, a document or a link.
    for secret in (token, forged, MEMBER, "stranger", "ortho.example", "Rose Taylor",
                   "plan-of-care"):
        assert secret not in text
    assert "@" not in text

    # A worker that stops leaves accepted mail in the spool: the gauge shows it, and its age.
    assert service.service.worker.stop(10)
    service.send(share_message(subject="waits in the spool"))
    time.sleep(1.1)
    _, stuck = scrape(port)
    assert value(stuck, "mailbridge_intake_accepted_total", channel="smtp") == 2
    assert value(stuck, "mailbridge_spool_messages", state="queued") == 1
    assert value(stuck, "mailbridge_spool_oldest_age_seconds", state="queued") >= 1


def test_probing_the_portal_with_made_up_urls_adds_no_series(service):
    """An attacker who tries a thousand tokens or paths must not make a thousand series."""
    port, web = service.service.metrics_port, service.service.web_port
    for _ in range(30):
        fetch(web, f"/s/{secrets.token_urlsafe(32)}")
        fetch(web, f"/{secrets.token_hex(8)}/{secrets.token_hex(8)}")
        fetch(web, f"/staff/{secrets.token_hex(8)}")
    text, samples = scrape(port)
    routes = {dict(labels)["route"] for (name, labels) in samples
              if name == "mailbridge_portal_requests_total"}
    assert routes <= {"links.link_page", "unmatched"}
    assert value(samples, "mailbridge_portal_requests_total", route="unmatched",
                 status="404") == 60


def test_the_counters_take_only_values_from_their_fixed_sets(runtime):
    runtime.metrics.refused("smtp", "<jane.doe@clinic.example> said hi")
    runtime.metrics.refused("ftp", "not_a_member")
    runtime.metrics.delivered("link+dr.smith@ortho.example", "sent")
    runtime.metrics.request_served("links.link_page", 999, 0.1)
    labels = {value for metric in runtime.metrics.registry.collect()
              for sample in metric.samples for value in sample.labels.values()}
    assert not any("@" in label for label in labels)
    assert "other" in labels


def test_metrics_listen_on_loopback_by_default(tmp_path, sink, keyring):
    defaults = make_settings(tmp_path / "defaults")
    port = defaults.metrics.port  # make_settings sets 0 so tests side by side never meet
    assert port == 0
    from mailbridge.config import load_settings
    from tests.conftest import OUTBOUND_FROM, REPLY_DOMAIN, SHARING

    plain = load_settings(None, env={
        "MAILBRIDGE_SERVICE_BASE_URL": "https://portal.example",
        "MAILBRIDGE_ADDRESSES_SHARING": SHARING,
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": REPLY_DOMAIN,
        "MAILBRIDGE_OUTBOUND_FROM": OUTBOUND_FROM})
    assert (plain.metrics.enabled, plain.metrics.host, plain.metrics.port) == \
        (True, "127.0.0.1", 9464)

    running = start_service(tmp_path, f"sqlite:///{tmp_path / 'mb.db'}", sink, keyring)
    try:
        bound = running.service.metrics_server.socket.getsockname()
        assert bound[0] == "127.0.0.1"
        outside = _non_loopback_address()
        if outside is not None:  # reachable on loopback only
            with pytest.raises(OSError), socket.create_connection((outside, bound[1]), 2):
                pass
        assert scrape(bound[1])[1][("mailbridge_database_up", ())] == 1
        # Prometheus keeps its connection open between scrapes; the stop does not wait for it.
        keep_alive = http.client.HTTPConnection("127.0.0.1", bound[1], timeout=10)
        keep_alive.request("GET", "/metrics")
        assert keep_alive.getresponse().read().startswith(b"# HELP")
    finally:
        started = time.monotonic()
        assert running.service.stop(timeout=3)
    assert time.monotonic() - started < 3
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", bound[1]), 2):
        pass  # stopped with the service
    keep_alive.close()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent; it picks the outgoing address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_a_metrics_port_in_use_is_a_config_error_naming_it(tmp_path, sink, keyring):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as error:
            start_service(tmp_path, f"sqlite:///{tmp_path / 'mb.db'}", sink, keyring,
                          MAILBRIDGE_METRICS_PORT=str(port))
    assert str(error.value) == f"[metrics] port: 127.0.0.1:{port} is already in use"


def test_metrics_can_be_turned_off(tmp_path, sink, keyring):
    running = start_service(tmp_path, f"sqlite:///{tmp_path / 'mb.db'}", sink, keyring,
                            MAILBRIDGE_METRICS_ENABLED="false")
    try:
        assert running.service.metrics_server is None and running.service.metrics_port is None
    finally:
        assert running.service.stop(timeout=5)


def test_worker_samples_add_up_and_a_restart_never_takes_counts_back(runtime):
    parent = runtime.metrics
    parent.accepted("smtp")
    parent.delivered("code", "sent")  # the parent's own count of a kind workers also count
    first, second = Metrics(runtime.db, runtime.clock), Metrics(runtime.db, runtime.clock)
    for worker, shares in ((first, 2), (second, 3)):
        for _ in range(shares):
            worker.share_created()
            worker.delivered("link", "sent")
        worker.delivered("code", "sent")
    first.delivered("link", "retried")
    first.job_ran("expire", 0.2, failed=False)  # a series the parent does not have
    parent.workers.update(("worker", 1), first.snapshot())
    parent.workers.update(("worker", 2), second.snapshot())
    sample = parent.registry.get_sample_value

    assert sample("mailbridge_shares_created_total") == 5
    assert sample("mailbridge_outbound_sent_total", {"kind": "link"}) == 5
    assert sample("mailbridge_outbound_sent_total", {"kind": "code"}) == 3
    assert sample("mailbridge_outbound_retries_total", {"kind": "link"}) == 1
    assert sample("mailbridge_intake_accepted_total", {"channel": "smtp"}) == 1
    assert sample("mailbridge_job_duration_seconds_count", {"job": "expire"}) == 1
    assert sample("mailbridge_job_duration_seconds_bucket", {"job": "expire", "le": "0.5"}) == 1
    assert sample("mailbridge_job_duration_seconds_bucket", {"job": "expire", "le": "0.1"}) == 0
    # A time is not an amount: the parent's own `_created`, not a sum of three.
    created = sample("mailbridge_shares_created_created")
    assert created == parent.own.get_sample_value("mailbridge_shares_created_created")

    # Worker 1 is killed after counting once more than it reported: its last report stays;
    # the run that replaces it starts at 0 and adds to it.
    first.share_created()
    parent.workers.ended(("worker", 1))
    assert sample("mailbridge_shares_created_total") == 5
    restarted = Metrics(runtime.db, runtime.clock)
    parent.workers.update(("worker", 3), restarted.snapshot())
    assert sample("mailbridge_shares_created_total") == 5
    restarted.share_created()
    parent.workers.update(("worker", 3), restarted.snapshot())
    assert sample("mailbridge_shares_created_total") == 6
    parent.workers.ended(("worker", 3))
    parent.workers.ended(("worker", 3))  # said twice: counted once
    assert sample("mailbridge_shares_created_total") == 6

    # The exposition stays one family per name, and Prometheus's parser reads it.
    from prometheus_client import generate_latest

    names = [family.name for family in
             text_string_to_metric_families(generate_latest(parent.registry).decode())]
    assert len(names) == len(set(names))
    assert "mailbridge_shares_created" in names


@pytest.fixture
def site(tmp_path):
    """`serve` on a PostgreSQL database of its own with two worker processes, a real relay."""
    try:
        db = Postgres()
    except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
        if os.environ.get("MAILBRIDGE_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    try:
        with SmtpSink() as sink:
            made = Site(tmp_path, db, sink)
            made.write_config(worker={"processes": 2})
            made.init()
            try:
                yield made
            finally:
                made.kill_all()
    finally:
        db.drop()


def test_the_scrape_of_serve_counts_the_work_of_its_worker_processes(site):
    node = site.serve()
    port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", node.stdout)[1])
    pids = [int(p) for p in re.search(r"worker process\(es\) \(pids ([\d ]+)\)",
                                      node.stdout)[1].split()]
    assert len(pids) == 2
    seen: list[tuple[float, float, float]] = []

    def counts() -> tuple[float, float, float]:
        _, samples = scrape(port)
        now = (value(samples, "mailbridge_shares_created_total"),
               value(samples, "mailbridge_outbound_sent_total", kind="link"),
               value(samples, "mailbridge_outbound_sent_total", kind="receipt"))
        if seen:  # a counter never goes back, whatever happens to a worker process
            assert all(a <= b for a, b in zip(seen[-1], now, strict=True)), (seen[-1], now)
        seen.append(now)
        return now

    def counted(n: int) -> bool:
        return counts() == (n, n, n)

    assert counts() == (0, 0, 0)
    Sender(site).send(range(3))
    wait_until(lambda: delivered(site.sink, {0, 1, 2}) and settled(site), "3 links", 60)
    wait_until(lambda: counted(3), "the worker processes' counts of 3 in the scrape", 10)
    _, samples = scrape(port)
    assert value(samples, "mailbridge_intake_accepted_total", channel="smtp") == 3

    os.kill(pids[0], signal.SIGKILL)  # the parent restarts it
    wait_until(lambda: "worker process 1 ended" in node.log, "the parent to see it", 10)
    assert counts() == (3, 3, 3)
    Sender(site).send(range(3, 6))
    wait_until(lambda: delivered(site.sink, set(range(6))) and settled(site), "6 links", 60)
    wait_until(lambda: counted(6), "the counts of 6, the killed process's 3 kept", 10)
    status, _ = node.terminate()
    assert status == 0


@pytest.fixture
def own_postgres():
    """A database of this test's own, so connections to it can be refused for a while."""
    from tests.faults.harness import postgres_or_skip

    db = postgres_or_skip()
    yield db
    db.drop()


def test_a_database_outage_is_a_gauge_not_a_failed_scrape(tmp_path, sink, keyring,
                                                          own_postgres):
    running = start_service(tmp_path, own_postgres.url, sink, keyring)
    port = running.service.metrics_port
    try:
        assert value(scrape(port)[1], "mailbridge_database_up") == 1
        own_postgres.allow_connections(False)  # refused, and every connection cut
        try:
            text, down = scrape(port)
            assert value(down, "mailbridge_database_up") == 0
            assert "mailbridge_spool_messages{" not in text  # no figures it could not read
            assert value(down, "mailbridge_intake_accepted_total", channel="smtp") == 0
        finally:
            own_postgres.allow_connections(True)
        _, back = scrape(port)
        assert value(back, "mailbridge_database_up") == 1
        assert value(back, "mailbridge_spool_messages", state="queued") == 0
    finally:
        running.service.stop(timeout=10)
