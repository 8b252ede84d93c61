"""The Postfix policy delegation protocol over real sockets: many requests per connection, the
decision injected and run off the event loop, and hostile input answered DEFER_IF_PERMIT."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.receive.policy_protocol import (
    MALFORMED,
    MAX_ATTRIBUTES,
    MAX_LINE_BYTES,
    UNAVAILABLE,
    MalformedRequest,
    parse_request,
)
from tests.receive.policy_helpers import Client, RunningPolicy, request


def by_recipient(req: dict[str, str]) -> str:
    if req["recipient"] == "stranger@portal.example":
        return "REJECT 5.1.1 Recipient address rejected: no such address"
    return "DUNNO"


@pytest.fixture
def policy():
    with RunningPolicy(by_recipient) as running:
        yield running


def test_many_requests_on_one_connection_each_get_their_own_answer(policy):
    with Client(policy.port) as client:
        for recipient, expected in [
            ("share@portal.example", "DUNNO"),
            ("stranger@portal.example",
             "REJECT 5.1.1 Recipient address rejected: no such address"),
            ("share@portal.example", "DUNNO"),
        ]:
            client.send(request(recipient))
            assert client.answer() == expected
    assert policy.server.requests_answered == 3


def test_pipelined_requests_are_answered_in_order(policy):
    with Client(policy.port) as client:
        client.send(request("stranger@portal.example") + request("share@portal.example"))
        assert client.answer().startswith("REJECT 5.1.1")
        assert client.answer() == "DUNNO"


def test_decide_sees_every_attribute_and_runs_off_the_event_loop():
    seen = []

    def decide(req):
        seen.append((dict(req), threading.current_thread().name))
        return "DUNNO"

    with RunningPolicy(decide) as policy, Client(policy.port) as client:
        client.send(request(sender="", size="1234", queue_id="ABC123"))
        assert client.answer() == "DUNNO"
    attributes, thread = seen[0]
    assert attributes["recipient"] == "share@portal.example"
    assert attributes["sender"] == "" and attributes["size"] == "1234"
    assert attributes["client_address"] == "192.0.2.1"
    assert thread.startswith("decide")  # the executor's thread, not the loop's


def test_a_slow_decision_does_not_hold_up_other_connections():
    release = threading.Event()

    def decide(req):
        if req["recipient"] == "slow@portal.example":
            release.wait(5)
        return "DUNNO"

    with RunningPolicy(decide) as policy, Client(policy.port) as slow, \
            Client(policy.port) as quick:
        slow.send(request("slow@portal.example"))
        started = time.monotonic()
        quick.send(request("share@portal.example"))
        assert quick.answer() == "DUNNO"
        assert time.monotonic() - started < 2
        release.set()
        assert slow.answer() == "DUNNO"


def test_crlf_line_endings_are_read_too(policy):
    with Client(policy.port) as client:
        client.send(request("stranger@portal.example").replace(b"\n", b"\r\n"))
        assert client.answer().startswith("REJECT 5.1.1")


# --- hostile or broken input ------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"request=smtpd_access_policy\nthis line has no equals sign\n\n",
    b"protocol_state=RCPT\nrecipient=a@portal.example\n\n",  # no request=smtpd_access_policy
    b"request=junk_request\nrecipient=a@portal.example\n\n",
    b"request=smtpd_access_policy\nrecipient=a@portal.example\nrecipient=b@portal.example\n\n",
    b"request=smtpd_access_policy\nrecipient=\xff\xfe@portal.example\n\n",
    b"request=smtpd_access_policy\nRecipient\x00=x\n\n",
    b"request=smtpd_access_policy\n=value\n\n",
    b"\n",  # an empty request
], ids=["no-equals", "no-request-type", "wrong-request-type", "repeated", "not-utf8",
        "bad-name", "empty-name", "empty"])
def test_a_malformed_request_is_deferred_and_its_connection_closed(policy, data):
    with Client(policy.port) as client:
        client.send(request() + data + request())
        assert client.answer() == "DUNNO"  # the good request before it
        assert client.answer() == MALFORMED
        assert client.closed()  # the request after it is never read
    with Client(policy.port) as fresh:  # the server itself is unharmed
        fresh.send(request())
        assert fresh.answer() == "DUNNO"


def test_an_overlong_line_is_refused_without_being_stored(policy):
    with Client(policy.port) as client:
        client.send(b"request=smtpd_access_policy\nrecipient=" + b"a" * (MAX_LINE_BYTES * 4))
        assert client.answer() == MALFORMED
        assert client.closed()


def test_too_many_attributes_are_refused(policy):
    padding = b"".join(b"x%d=1\n" % n for n in range(MAX_ATTRIBUTES + 5))
    with Client(policy.port) as client:
        client.send(b"request=smtpd_access_policy\n" + padding + b"\n")
        assert client.answer() == MALFORMED
        assert client.closed()


def test_a_request_left_unfinished_is_deferred_after_the_request_timeout():
    with RunningPolicy(by_recipient, request_timeout=0.3) as policy, \
            Client(policy.port) as client:
        client.send(b"request=smtpd_access_policy\nrecipient=a@portal.example\n")
        started = time.monotonic()
        assert client.answer() == MALFORMED
        assert time.monotonic() - started < 3
        assert client.closed()


def test_an_idle_connection_is_closed_after_the_idle_timeout():
    with RunningPolicy(by_recipient, idle_timeout=0.3) as policy, Client(policy.port) as client:
        client.send(request())
        assert client.answer() == "DUNNO"
        started = time.monotonic()
        assert client.closed()
        assert 0.2 < time.monotonic() - started < 3
        assert policy.server.connections == 0


def test_a_peer_closing_mid_request_leaves_the_server_serving(policy):
    client = Client(policy.port)
    client.send(b"request=smtpd_access_policy\nrecipient=a@po")
    client.close()
    with Client(policy.port) as fresh:
        fresh.send(request())
        assert fresh.answer() == "DUNNO"


def test_connections_beyond_the_cap_are_closed_at_once():
    with RunningPolicy(by_recipient, max_connections=2) as policy:
        first, second = Client(policy.port), Client(policy.port)
        for client in (first, second):  # both really held open by the server
            client.send(request())
            assert client.answer() == "DUNNO"
        with Client(policy.port) as third:
            assert third.closed()
        first.close()
        deadline = time.monotonic() + 3
        while policy.server.connections > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with Client(policy.port) as fourth:  # room again once one has gone
            fourth.send(request())
            assert fourth.answer() == "DUNNO"
        second.close()


# --- a decision that goes wrong is our trouble: defer, keep the connection --------------------


@pytest.mark.parametrize("result", [
    "REJECT 5.7.1 no\naction=OK",  # a newline would let a value inject a second answer
    "",
    None,
    "OK\x00",
    "REJECT " + "x" * 5000,
], ids=["newline", "empty", "none", "nul", "overlong"])
def test_an_unsendable_decision_is_answered_defer_if_permit(result):
    with RunningPolicy(lambda req: result) as policy, Client(policy.port) as client:
        client.send(request())
        assert client.answer() == UNAVAILABLE
        client.send(request())
        assert client.answer() == UNAVAILABLE  # the connection stays usable


def test_a_failing_decision_defers_and_keeps_the_connection():
    calls = []

    def decide(req):
        calls.append(req["recipient"])
        if len(calls) == 1:
            raise ConnectionError("database is down")
        return "DUNNO"

    with RunningPolicy(decide) as policy, Client(policy.port) as client:
        client.send(request())
        assert client.answer() == UNAVAILABLE
        client.send(request())
        assert client.answer() == "DUNNO"


def test_stop_closes_open_connections():
    policy = RunningPolicy(by_recipient).__enter__()
    client = Client(policy.port)
    client.send(request())
    assert client.answer() == "DUNNO"
    policy.__exit__(None, None, None)
    assert client.closed()
    client.close()


# --- the parser alone -------------------------------------------------------------------------


def test_parse_request_keeps_values_verbatim():
    lines = request(sender="a=b@clinic.example").rstrip(b"\n").split(b"\n")
    parsed = parse_request(lines)
    assert parsed["sender"] == "a=b@clinic.example"  # only the first "=" separates
    assert parsed["request"] == "smtpd_access_policy"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=MAX_ATTRIBUTES + 3))
def test_parse_request_either_parses_or_says_malformed(lines):
    lines = [line.replace(b"\n", b"") for line in lines]
    try:
        parsed = parse_request(lines)
    except MalformedRequest:
        return
    assert parsed["request"] == "smtpd_access_policy"
    assert all("\n" not in value for value in parsed.values())


# --- with the real Postfix ---------------------------------------------------------------------


@pytest.mark.slow
def test_postfix_refuses_at_rcpt_what_the_policy_rejects_and_queues_no_bounce(sink):
    """check_policy_service as docs/deploy/postfix.md places it: Postfix asks at RCPT, a
    REJECT is its own 5xx in the dialogue, the rest is relayed, and nothing waits in its
    queue (no bounce to a possibly forged sender)."""
    import shutil
    import smtplib

    from tests import postfix

    postfix.require()
    asked = []

    def decide(req):
        asked.append(req)
        if req["recipient"] == "blocked@portal.example":
            return "REJECT 5.7.1 Sender is not allowed to send to this address"
        return "DUNNO"

    directory = postfix.service_dir()
    raw = (b"From: outsider@elsewhere.example\r\nTo: blocked@portal.example\r\n"
           b"Subject: test\r\nMessage-ID: <p1@elsewhere.example>\r\n\r\nbody\r\n")
    try:
        with RunningPolicy(decide) as policy, postfix.PostfixInstance(
                directory, mailbridge_port=sink.port, policy_port=policy.port) as mx:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                mx.send(raw, "outsider@elsewhere.example", ["blocked@portal.example"])
            code, text = refused.value.recipients["blocked@portal.example"]
            assert code // 100 == 5 and b"5.7.1" in text
            # Per recipient: in one transaction one is refused, the other relayed.
            partly = mx.send(raw, "outsider@elsewhere.example",
                             ["blocked@portal.example", "share@portal.example"])
            assert list(partly) == ["blocked@portal.example"]
            mx.wait_delivered(1)
            assert [m.rcpt_tos for m in sink.messages] == [["share@portal.example"]]
            assert mx.queue_ids() == []
            assert "NOQUEUE: reject: RCPT" in mx.log
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    first = asked[0]
    assert first["protocol_state"] == "RCPT"
    assert first["client_address"] == postfix.OUTSIDE_CLIENT
    assert first["sender"] == "outsider@elsewhere.example"
