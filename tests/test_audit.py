"""The audit trail can be read back per share and per grant, in the order things happened."""

from __future__ import annotations

import datetime as dt

from mailbridge import audit
from mailbridge.models import Grant
from tests.portal_helpers import make_share, portal_runtime

T0 = dt.datetime(2026, 11, 28, 12, 0)


def test_events_per_share_and_per_grant_in_time_order(runtime):
    rt = portal_runtime(runtime)
    share, _ = make_share(rt, recipients=("a@x.example", "b@x.example"))
    other, _ = make_share(rt, recipients=("c@x.example",))
    grant_a, grant_b = share.grants.order_by(Grant.id)
    with rt.db.atomic():
        late = audit.record("document_viewed", T0 + dt.timedelta(minutes=5), share=share,
                            grant=grant_a)
        first = audit.record("share_created", T0, share=share)
        code = audit.record("code_sent", T0 + dt.timedelta(minutes=1), grant=grant_b)
        same_time = audit.record("claimed", T0 + dt.timedelta(minutes=5), share=share,
                                 grant=grant_a)
        audit.record("share_created", T0, share=other, grant=other.grants.get())

    assert [e.id for e in audit.events_for_share(share.id)] == [first.id, code.id, late.id,
                                                                same_time.id]
    assert [e.id for e in audit.events_for_grant(grant_a.id)] == [late.id, same_time.id]
    assert [e.id for e in audit.events_for_grant(grant_b.id)] == [code.id]
    assert audit.events_for_share(999999) == []
