"""Scheduled jobs once per tick cluster-wide, on real PostgreSQL: two schedulers (two runtimes,
each with its own connections, on one database) never send a reminder twice — the job's
advisory lock keeps the second off while the first runs, and the reminder's own state guard
covers runs one after the other."""

from __future__ import annotations

import threading

import pytest

from mailbridge import schedule
from mailbridge.clock import ManualClock
from mailbridge.store import locks
from mailbridge.store.db import open_database
from mailbridge.store.models import AuditEvent, OutboundMessage
from tests.shares.test_notify import START, configured, shared

DOCTORS = [f"dr{i}@ortho.example" for i in range(20)]


@pytest.fixture
def db_url(postgres_url):
    from tests.conftest import _pg_connect

    db = _pg_connect(postgres_url)
    db.execute_sql("DROP SCHEMA public CASCADE")
    db.execute_sql("CREATE SCHEMA public")
    db.close()
    return postgres_url


@pytest.fixture
def two_nodes(runtime):
    """Two runtimes on one clock and one database, as two `serve` nodes would be."""
    clock = ManualClock(START)
    a = configured(runtime, clock)
    b = configured(runtime, clock)
    b = type(b)(**{**b.__dict__, "db": open_database(runtime.settings.database.url)})
    shared(a, recipients=DOCTORS)
    clock.advance(hours=21)  # 3 hours left: inside the 4-hour reminder window
    yield a, b
    b.db.close()


def reminders() -> list[str]:
    return [row.to_addr for row in OutboundMessage.select(OutboundMessage.to_addr)
            .where(OutboundMessage.kind == "reminder")]


def test_while_one_node_runs_a_job_the_others_skip_it(two_nodes):
    a, b = two_nodes
    with locks.exclusive(b.db, "job remind") as ours:  # node b is in the middle of `remind`
        assert ours
        done: list[int] = []
        thread = threading.Thread(target=lambda: done.append(schedule.run_job(a, "remind")))
        thread.start()
        thread.join(10)
        assert done == [0] and reminders() == []  # skipped at once, not queued behind b
        with locks.exclusive(b.db, "job expire") as other_job:
            assert other_job  # one lock per job: other jobs run meanwhile
    assert schedule.run_job(a, "remind") == len(DOCTORS)  # b is done: a's next tick runs


def test_two_schedulers_never_send_a_reminder_twice(two_nodes):
    a, b = two_nodes
    barrier = threading.Barrier(2)
    sent = {"a": 0, "b": 0}
    errors: list[BaseException] = []

    def scheduler(name, runtime) -> None:
        try:
            for _ in range(5):  # several ticks, side by side
                barrier.wait(10)
                sent[name] += schedule.run_job(runtime, "remind")
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            runtime.db.close()

    threads = [threading.Thread(target=scheduler, args=item) for item in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(reminders()) == sorted(DOCTORS)  # one each, never two
    assert sent["a"] + sent["b"] == len(DOCTORS)
    assert AuditEvent.select().where(AuditEvent.kind == "reminder_sent").count() == len(DOCTORS)


def test_lock_keys_are_stable_and_distinct():
    assert locks.key("job remind") == locks.key("job remind")
    names = [f"job {name}" for name in schedule.JOBS]
    assert len({locks.key(n) for n in names}) == len(names)
    assert all(-2 ** 31 <= locks.key(n) < 2 ** 31 for n in names)
