"""LMTP intake over real sockets (TCP and a Unix socket), as Postfix's lmtp: transport uses
it: LHLO, addresses not ours refused at RCPT, then one answer per accepted recipient after
DATA — 250 only once the message is committed, 5.7.1 for a non-member, 451 per recipient when
the database does not answer."""

from __future__ import annotations

import dataclasses
import smtplib
import socket
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailbridge.mail import senders
from mailbridge.receive.lmtp import make_lmtp_controller, per_recipient
from mailbridge.runtime import build_runtime
from mailbridge.store.models import InboundMessage
from tests.conftest import SHARING, free_port, make_settings
from tests.helpers import MEMBER, add_jane, share_message, wire

REPLY = "reply+" + "b" * 40 + "@reply.portal.example"


def lmtp_runtime(runtime, **lmtp):
    settings = runtime.settings
    changed = dataclasses.replace(settings, lmtp=dataclasses.replace(
        settings.lmtp, enabled=True, **lmtp))
    return dataclasses.replace(runtime, settings=changed)


class Listening:
    def __init__(self, runtime):
        self.runtime = runtime
        self.executor = ThreadPoolExecutor(max_workers=2)
        self.controller = make_lmtp_controller(runtime, self.executor)

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()
        self.executor.shutdown()


def deliver(target, raw: bytes, rcpts, sender=MEMBER) -> tuple[dict, list[tuple[int, bytes]]]:
    """(recipients refused at RCPT, the answers after DATA, one per accepted recipient)."""
    with smtplib.LMTP(*target) as lmtp:
        lmtp.ehlo("mx.portal.example")  # smtplib.LMTP sends it as LHLO
        lmtp.mail(sender)
        refused, accepted = {}, []
        for rcpt in rcpts:
            code, text = lmtp.rcpt(rcpt)
            if code // 100 == 2:
                accepted.append(rcpt)
            else:
                refused[rcpt] = (code, text)
        answers = [lmtp.data(wire(raw))]
        answers += [lmtp.getreply() for _ in accepted[1:]]
    return refused, answers


@pytest.fixture
def tcp(runtime):
    with Listening(lmtp_runtime(runtime, port=free_port())) as running:
        yield running, ("127.0.0.1", running.runtime.settings.lmtp.port)


def test_each_accepted_recipient_gets_its_own_answer_after_the_commit(tcp):
    running, target = tcp
    add_jane()
    refused, answers = deliver(target, bytes(share_message()),
                               [SHARING, "nobody@portal.example", REPLY])
    assert refused["nobody@portal.example"][0] == 550
    assert refused["nobody@portal.example"][1].startswith(b"5.1.1")
    assert [code for code, _ in answers] == [250, 250]
    assert answers[0][1] == f"2.0.0 <{SHARING}> Message accepted".encode()
    assert answers[1][1] == f"2.0.0 <{REPLY}> Message accepted".encode()
    [row] = InboundMessage.select()
    assert row.channel == "lmtp" and row.protocol == "LMTP"
    assert row.envelope_to == [SHARING, REPLY] and row.client_ip == "127.0.0.1"


def test_a_non_member_is_refused_for_each_recipient_and_nothing_is_kept(tcp):
    _, target = tcp
    add_jane()
    _, answers = deliver(target, bytes(share_message(sender="x@elsewhere.example")),
                         [SHARING, REPLY], sender="x@elsewhere.example")
    assert [(code, text[:5]) for code, text in answers] == [(550, b"5.7.1"), (550, b"5.7.1")]
    assert InboundMessage.select().count() == 0


def test_helo_and_ehlo_are_not_lmtp(tcp):
    _, target = tcp
    with socket.create_connection(target, timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO mx.portal.example\r\n")
        assert reader.readline().startswith(b"500")


def test_a_database_that_does_not_answer_gets_451_per_recipient(tmp_path):
    settings = make_settings(tmp_path / "data", "postgresql://mailbridge@127.0.0.1:9/none")
    runtime = lmtp_runtime(build_runtime(settings, master_key=b"k" * 32), port=free_port())
    with Listening(runtime):
        _, answers = deliver(("127.0.0.1", runtime.settings.lmtp.port),
                             bytes(share_message()), [SHARING, REPLY])
    assert [(code, text[:5]) for code, text in answers] == [(451, b"4.3.0"), (451, b"4.3.0")]


def test_over_a_unix_socket_the_mta_on_this_host_is_trusted(runtime, tmp_path):
    path = tmp_path / "lmtp.sock"
    add_jane()
    with Listening(lmtp_runtime(runtime, socket=str(path))):
        assert stat.S_ISSOCK(path.stat().st_mode)
        _, answers = deliver((str(path),), bytes(share_message()), [SHARING])
    assert answers[0][0] == 250
    row = InboundMessage.get()
    assert (row.channel, row.client_ip) == ("lmtp", "")
    assert senders.headers_trusted(row.channel, row.client_ip, runtime.settings)
    assert not senders.headers_trusted("lmtp", "198.51.100.4", runtime.settings)


def test_per_recipient_answers_keep_the_status_and_name_the_recipient():
    assert per_recipient("451 4.3.0 Temporary failure", "a@b.example") == (
        "451 4.3.0 <a@b.example> Temporary failure")


def test_lmtp_outcomes_are_counted_per_recipient_under_their_own_channel(tcp):
    running, target = tcp
    add_jane()
    deliver(target, bytes(share_message()), [SHARING, REPLY, "nobody@portal.example"])
    metrics = running.runtime.metrics
    assert metrics.intake_accepted.labels("lmtp")._value.get() == 2
    assert metrics.intake_refused.labels("lmtp", "no_such_address")._value.get() == 1
    assert metrics.intake_accepted.labels("smtp")._value.get() == 0
