"""What the policy service tells an MTA in front at RCPT, over its real socket, on SQLite and
PostgreSQL: addresses in our domains that do not exist are refused 5.1.1 (other domains the
MX serves are left alone), a non-member's mail to the sharing or a reply
address 5.7.1 (so the MTA refuses in its own dialogue and never bounces), bounces and members
pass with DUNNO, a client past its hourly budget and a database that does not answer are asked
to come back (DEFER_IF_PERMIT)."""

from __future__ import annotations

import dataclasses

import pytest

from mailbridge.receive import policy
from mailbridge.receive.policy import PolicyDecider, PolicyListener
from mailbridge.runtime import build_runtime
from tests.conftest import make_settings
from tests.helpers import MEMBER, add_jane
from tests.receive.policy_helpers import Client, request

OUTSIDER = "someone@elsewhere.example"
REPLY = "reply+" + "a" * 40 + "@reply.portal.example"
BOUNCE = "bounce+12.abcdef0123@reply.portal.example"


def enabled(runtime, **smtp):
    settings = runtime.settings
    changed = dataclasses.replace(
        settings, policy=dataclasses.replace(settings.policy, enabled=True, port=0),
        smtp=dataclasses.replace(settings.smtp, **smtp))
    return dataclasses.replace(runtime, settings=changed)


@pytest.fixture
def served(runtime):
    add_jane()
    listener = PolicyListener(enabled(runtime))
    listener.start()
    yield listener
    listener.stop(5)


@pytest.mark.parametrize(("recipient", "sender", "expected"), [
    ("share@portal.example", MEMBER, policy.DUNNO),
    ("share+urgent@portal.example", MEMBER.upper(), policy.DUNNO),
    ("share@portal.example", OUTSIDER, policy.NOT_A_MEMBER),
    ("share@portal.example", "", policy.NOT_A_MEMBER),
    (REPLY, OUTSIDER, policy.NOT_A_MEMBER),
    (REPLY, MEMBER, policy.DUNNO),
    (BOUNCE, "", policy.DUNNO),  # delivery reports come with a null sender
    ("nobody@portal.example", MEMBER, policy.NO_SUCH_ADDRESS),
    ("nobody@reply.portal.example", MEMBER, policy.NO_SUCH_ADDRESS),
    ("share@elsewhere.example", OUTSIDER, policy.DUNNO),  # another domain the MX serves
])
def test_each_recipient_gets_the_answer_mailbridge_would_give(served, recipient, sender,
                                                              expected):
    with Client(served.port) as client:
        client.send(request(recipient, sender=sender))
        assert client.answer() == expected


def test_only_rcpt_is_judged(served):
    with Client(served.port) as client:
        client.send(request("nobody@portal.example", protocol_state="DATA"))
        assert client.answer() == policy.DUNNO


def test_a_client_past_its_hourly_budget_is_deferred_but_never_halfway(runtime):
    add_jane()
    decide = PolicyDecider(enabled(runtime, max_messages_per_hour_per_ip=2),
                           clock=lambda: now[0])
    now = [1000.0]

    def ask(instance, recipient="share@portal.example", client="192.0.2.1"):
        return decide(dict(protocol_state="RCPT", recipient=recipient, sender=MEMBER,
                           client_address=client, instance=instance, size="0"))

    assert ask("m1") == ask("m2") == policy.DUNNO
    assert ask("m2", recipient=REPLY) == policy.DUNNO  # the same message's next recipient
    assert ask("m3") == policy.OVER_BUDGET
    assert ask("m3", client="192.0.2.9") == policy.DUNNO  # another client has its own
    assert ask("m4", client="127.0.0.1") == policy.DUNNO  # a trusted relay has none
    now[0] += 3601
    assert ask("m5") == policy.DUNNO


def test_a_database_that_does_not_answer_defers(tmp_path):
    settings = make_settings(tmp_path / "data", "postgresql://mailbridge@127.0.0.1:9/none")
    runtime = build_runtime(settings, master_key=b"k" * 32)
    decide = PolicyDecider(runtime)
    answer = decide(dict(protocol_state="RCPT", recipient="share@portal.example",
                         sender=MEMBER, client_address="192.0.2.1", instance="x"))
    assert answer == policy.UNAVAILABLE
    # Addresses that are not ours need no database: still refused at once.
    assert decide(dict(protocol_state="RCPT", recipient="nobody@portal.example",
                       sender=MEMBER)) == policy.NO_SUCH_ADDRESS


def test_a_port_in_use_is_an_error_naming_the_key(runtime, tmp_path):
    from mailbridge.config import ConfigError
    from mailbridge.service import listener

    first = PolicyListener(enabled(runtime))
    first.start()
    try:
        busy = dataclasses.replace(runtime.settings.policy, port=first.port)
        second = PolicyListener(dataclasses.replace(
            runtime, settings=dataclasses.replace(runtime.settings, policy=busy)))
        with pytest.raises(ConfigError, match=r"^\[policy\] port: .* is already in use"):
            with listener("[policy] port", busy.host, busy.port):
                second.start()
    finally:
        first.stop(5)
