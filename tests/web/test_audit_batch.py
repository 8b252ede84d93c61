"""Portal audit events recorded at the same moment share one transaction, on SQLite and
PostgreSQL: each request returns only when its own event is committed, the chain verifies,
and one bad event fails only its own request."""

from __future__ import annotations

import threading
import time

from mailbridge.store import audit
from mailbridge.store.models import AuditEvent
from mailbridge.web.audit_batch import AuditBatcher


def test_events_of_concurrent_requests_are_written_together(runtime, monkeypatch):
    batcher = AuditBatcher(runtime.db, runtime.audit_key)
    writes = []
    record_many = audit.record_many

    def counting(key, events):
        events = list(events)
        writes.append(len(events))
        return record_many(key, events)

    monkeypatch.setattr(audit, "record_many", counting)
    now = runtime.clock()
    results: dict[int, object] = {}

    def request(n: int, event: dict) -> None:
        try:
            batcher.record(event)
            results[n] = AuditEvent.select().where(AuditEvent.ip == f"192.0.2.{n}").count()
        except Exception as exc:  # noqa: BLE001 - what the request would answer with
            results[n] = exc
        finally:
            runtime.db.close()

    batcher._writer.acquire()  # a write in progress: the next requests queue behind it
    events = {n: {"kind": "document_downloaded", "at": now, "ip": f"192.0.2.{n}"}
              for n in range(1, 6)}
    events[3] = {**events[3], "bogus": 1}
    threads = [threading.Thread(target=request, args=(n, e)) for n, e in events.items()]
    for t in threads:
        t.start()
    while len(batcher._pending) < 5:
        time.sleep(0.01)
    batcher._writer.release()
    for t in threads:
        t.join()

    assert isinstance(results.pop(3), TypeError)
    assert results == {1: 1, 2: 1, 4: 1, 5: 1}  # committed before each request went on
    assert writes[0] == 5  # tried together; the bad one then made each go on its own
    assert AuditEvent.select().count() == 4
    assert audit.verify(runtime.audit_key).ok


def test_an_event_inside_an_open_transaction_is_part_of_it(runtime):
    batcher = AuditBatcher(runtime.db, runtime.audit_key)
    try:
        with runtime.db.atomic():
            batcher.record({"kind": "document_viewed", "at": runtime.clock()})
            raise RuntimeError("the request failed after recording")
    except RuntimeError:
        pass
    assert AuditEvent.select().count() == 0
