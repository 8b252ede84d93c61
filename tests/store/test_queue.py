"""The leased queue on real PostgreSQL: claimers use `FOR UPDATE SKIP LOCKED`, so a row another
transaction holds is passed by (not waited for), and two claimers on their own connections —
two workers or two nodes — never take the same row, for the spool and for the outbox."""

from __future__ import annotations

import threading
import time
from email.message import EmailMessage

import pytest
from playhouse.db_url import connect

from mailbridge.outbound import outbox
from mailbridge.receive import spool
from mailbridge.store import queue
from mailbridge.store.models import InboundMessage, OutboundMessage
from tests.helpers import MEMBER, share_message, wire


@pytest.fixture
def db_url(postgres_url):
    """PostgreSQL only: SQLite keeps the compare-and-set claim (tests/outbound/test_outbox)."""
    from tests.conftest import _pg_connect

    db = _pg_connect(postgres_url)
    db.execute_sql("DROP SCHEMA public CASCADE")
    db.execute_sql("CREATE SCHEMA public")
    db.close()
    return postgres_url


def fill_spool(runtime, n: int) -> list[int]:
    raw = wire(share_message())
    return [spool.enqueue(runtime, raw, channel="smtp", envelope_from=MEMBER,
                          envelope_to=["share@portal.example"]).id for _ in range(n)]


def fill_outbox(runtime, n: int) -> list[int]:
    ids = []
    with runtime.db.atomic():
        for i in range(n):
            msg = EmailMessage()
            msg["Message-ID"] = f"<q{i}@portal.example>"
            msg.set_content("x")
            ids.append(outbox.enqueue(runtime, msg, kind="code", to_addr=f"r{i}@x.example").id)
    return ids


QUEUES = {"spool": (spool.QUEUE, fill_spool), "outbox": (outbox.QUEUE, fill_outbox)}


def claim(runtime, q: queue.Queue, node: str, limit: int) -> list[int]:
    return queue.claim(runtime.db, q, now=runtime.clock(), lease_seconds=60, node=node,
                       limit=limit)


@pytest.mark.parametrize("name", QUEUES)
def test_a_row_locked_by_another_claimer_is_passed_by_not_waited_for(runtime, postgres_url,
                                                                      name):
    q, fill = QUEUES[name]
    first, second = fill(runtime, 2)
    other = connect(postgres_url)  # another node's connection
    other.connect()
    try:
        other.begin()  # another claimer is in the middle of taking the oldest row
        m = q.model
        list(m.select(m.id).where(m.id == first).for_update().bind(other))
        started = time.monotonic()
        assert claim(runtime, q, "node-b", 5) == [second]
        assert time.monotonic() - started < 2  # a compare-and-set UPDATE would block here
        other.rollback()  # that claimer gave up: the row is free again
        assert claim(runtime, q, "node-b", 5) == [first]
    finally:
        other.close()


@pytest.mark.parametrize("name", QUEUES)
def test_two_claimers_hammering_one_queue_never_take_the_same_row(runtime, name):
    q, fill = QUEUES[name]
    ids = fill(runtime, 300)
    taken: dict[str, list[int]] = {"node-a": [], "node-b": []}
    rounds = {"node-a": 0, "node-b": 0}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def claimer(node: str) -> None:
        try:
            barrier.wait()
            while batch := claim(runtime, q, node, 3):  # a small batch, as workers take
                taken[node] += batch
                rounds[node] += 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            runtime.db.close()  # each thread had its own connection

    threads = [threading.Thread(target=claimer, args=(node,)) for node in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert not set(taken["node-a"]) & set(taken["node-b"])
    assert sorted(taken["node-a"] + taken["node-b"]) == sorted(ids)
    assert all(rounds.values()), rounds  # both really claimed, side by side
    m = q.model
    rows = list(m.select(m.id, m.claimed_by, m.attempts, m.state))
    assert {r.state for r in rows} == {q.working} and {r.attempts for r in rows} == {1}
    for node, mine in taken.items():
        assert {r.id for r in rows if r.claimed_by == node} == set(mine)


def test_a_batch_is_the_oldest_due_rows_and_lapsed_leases_are_taken_over(runtime):
    ids = fill_spool(runtime, 4)
    assert claim(runtime, spool.QUEUE, "node-a", 2) == ids[:2]
    InboundMessage.update(lease_until=runtime.clock()).where(
        InboundMessage.id == ids[0]).execute()  # node a died holding it; the lease ran out
    time.sleep(0.01)
    assert claim(runtime, spool.QUEUE, "node-b", 2) == [ids[0], ids[2]]
    assert InboundMessage.get_by_id(ids[0]).attempts == 2
    assert OutboundMessage.select().count() == 0

