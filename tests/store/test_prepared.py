"""Queries compiled once (store/prepared.py): the same rows as the peewee query itself,
joined rows included, on SQLite and PostgreSQL; values are bound, never spliced into SQL."""

from __future__ import annotations

import datetime as dt

import peewee
import pytest

from mailbridge.store.models import Account, Clinic, WebSession
from mailbridge.store.prepared import Prepared

NOW = dt.datetime(2026, 11, 30, 9, 0)


def _session(id_hash: str) -> peewee.Query:
    return (WebSession.select(WebSession, Account)
            .join(Account, peewee.JOIN.LEFT_OUTER, on=(WebSession.account == Account.id))
            .where((WebSession.id_hash == id_hash) & WebSession.ended_at.is_null()).limit(1))


@pytest.fixture
def sessions(runtime):
    for name in ("a", "b"):
        account = Account.create(email=f"{name}@ortho.example", password_hash="x",  # noqa: S106
                                 created_at=NOW, verified_at=NOW)
        WebSession.create(id_hash=f"hash-{name}", account=account, created_at=NOW,
                          last_seen_at=NOW)
    WebSession.create(id_hash="hash-ended", created_at=NOW, last_seen_at=NOW, ended_at=NOW)


def test_each_call_binds_its_own_values_and_joins_like_the_query(sessions):
    prepared = Prepared(_session, str)
    for id_hash in ("hash-a", "hash-b", "hash-a", "hash-ended", "nothing"):
        expected = list(_session(id_hash))
        got = prepared(id_hash)
        assert [row.id_hash for row in got] == [row.id_hash for row in expected]
        assert [row.account.email if row.account else None for row in got] == \
               [row.account.email if row.account else None for row in expected]
    # Later calls reuse the first call's column mapping: values still come back converted.
    again = prepared("hash-b")[0]
    assert again.account.email == "b@ortho.example"
    assert again.created_at == NOW and again.account.verified_at == NOW


def test_a_value_shaped_like_sql_is_only_a_value(sessions):
    prepared = Prepared(_session, str)
    assert prepared("x' OR '1'='1") == []
    assert prepared('x" OR 1=1 --') == []


def test_ints_take_ids_or_rows(runtime):
    first = Clinic.create(name="Riverside PT", created_at=NOW)
    second = Clinic.create(name="Lakeside PT", created_at=NOW)
    by_id = Prepared(lambda clinic_id: Clinic.select().where(Clinic.id == clinic_id), int)
    assert [c.name for c in by_id(second.id)] == ["Lakeside PT"]
    assert [c.name for c in by_id(first)] == ["Riverside PT"]


def test_an_argument_the_sql_does_not_hold_exactly_once_is_refused(runtime):
    twice = Prepared(lambda n: Clinic.select().where((Clinic.id == n) | (Clinic.id == n)), int)
    with pytest.raises(ValueError, match="exactly once"):
        twice(1)
    with pytest.raises(TypeError):
        Prepared(lambda when: Clinic.select().where(Clinic.created_at == when), dt.datetime)


def test_the_first_result_decides_no_later_ones_shape(sessions):
    # The first row seen has no account (an outer join's NULLs), later ones have one; then
    # the other way round, on a second statement: each row is built from its own values.
    WebSession.create(id_hash="hash-staff", created_at=NOW, last_seen_at=NOW)
    first_empty = Prepared(_session, str)
    assert first_empty("nothing") == []
    staff = first_empty("hash-staff")[0]
    assert staff.account is None and staff.last_seen_at == NOW
    with_account = first_empty("hash-a")[0]
    assert with_account.account.email == "a@ortho.example"
    assert with_account.account.verified_at == NOW
    first_full = Prepared(_session, str)
    assert first_full("hash-b")[0].account.email == "b@ortho.example"
    assert first_full("hash-staff")[0].account is None
    assert [row.account.email for row in (first_full("hash-a") + first_full("hash-b"))] == \
           ["a@ortho.example", "b@ortho.example"]
