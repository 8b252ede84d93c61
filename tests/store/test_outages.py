"""One warning per outage for a node, however many worker processes meet it: the processes
announce the start and end of their outages and `OutageBoard` logs them once."""

from __future__ import annotations

import logging

from mailbridge.store.outages import Outage, OutageBoard

LOGGER = "mailbridge.outbound.dispatcher"


def lines(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]


def processes(board: OutageBoard, count: int) -> list[Outage]:
    """`count` worker processes' outbox outages, announcing to `board` as over their pipes."""
    return [Outage(logging.getLogger(LOGGER), "outbox",
                   announce=lambda *item, source=k: board.announce(source, *item))
            for k in range(count)]


def test_an_outage_every_process_meets_is_logged_once_when_it_starts_and_once_when_it_ends(
        caplog):
    caplog.set_level(logging.INFO)
    board = OutageBoard()
    first, second = processes(board, 2)
    for _ in range(3):
        first.failed("database unavailable")
        second.failed("database unavailable")
    assert len(lines(caplog, "outbox: database unavailable")) == 1
    first.ended()
    assert lines(caplog, "working again") == []  # the other process still waits
    second.ended()
    assert len(lines(caplog, "working again")) == 1
    assert len(lines(caplog, "outbox: working again after database unavailable")) == 1
    first.failed("database unavailable")  # a new outage: warned again
    assert len(lines(caplog, "outbox: database unavailable")) == 2


def test_a_process_that_dies_in_an_outage_does_not_hold_it_open_nor_end_it(caplog):
    caplog.set_level(logging.INFO)
    board = OutageBoard()
    first, second = processes(board, 2)
    first.failed("storage full")
    second.failed("storage full")
    board.gone(0)  # killed; the other process is still in the outage
    assert lines(caplog, "working again") == []
    second.ended()
    assert len(lines(caplog, "outbox: working again after storage full")) == 1
    second.failed("storage full")
    board.gone(1)  # the last one in it died: closed without a line
    assert len(lines(caplog, "working again")) == 1
    processes(board, 3)[2].failed("storage full")  # its successor still meets it: warned
    assert len(lines(caplog, "outbox: storage full")) == 3


def test_a_process_that_logs_for_itself_still_warns_once_and_announces_nothing(caplog):
    caplog.set_level(logging.INFO)
    outage = Outage(logging.getLogger(LOGGER), "outbox")
    outage.failed("database unavailable")
    outage.failed("database unavailable")
    outage.ended()
    assert len(lines(caplog, "outbox: database unavailable")) == 1
    assert len(lines(caplog, "outbox: working again after database unavailable")) == 1
