"""Queries compiled once: a fixed-shape peewee query becomes SQL on its first use, and later
calls only bind new values. On the portal's hot paths building the SQL cost more than the
database's whole answer."""

from __future__ import annotations

from collections.abc import Callable

import peewee


class Prepared:
    """`build(*args)` returns a peewee SELECT whose SQL does not depend on the values of its
    arguments (no IN lists, no None); `kinds` says what each argument is, `int` (an id or a
    model row) or `str`. Calling runs the compiled SQL with new values and returns the model
    rows the query itself would, joined rows included."""

    def __init__(self, build: Callable[..., peewee.Query], *kinds: type) -> None:
        if any(kind not in (int, str) for kind in kinds):
            raise TypeError("prepared arguments are int or str")
        self._build, self._kinds = build, kinds
        self._compiled: tuple | None = None
        self._layout: tuple | None = None  # (compiled query, its result's column mapping)

    def __call__(self, *args) -> list:
        query, sql, params, slots = self._compile()
        bound = list(params)
        for slot, kind, value in zip(slots, self._kinds, args, strict=True):
            bound[slot] = int(getattr(value, "id", value)) if kind is int else str(value)
        cursor = query._database.execute_sql(sql, bound)
        wrapper = query._get_cursor_wrapper(cursor)
        layout = self._layout
        known = layout is not None and layout[0] is query
        if known:
            # peewee works out which column builds which model afresh for every result, from
            # the cursor's description: for one SQL text that is the same every time, and it
            # cost more than SQLite's whole answer. The first result's mapping serves them all.
            wrapper.__dict__.update(layout[1])
            wrapper.initialized = True
        rows = list(wrapper)
        if not known and wrapper.initialized:  # peewee maps columns only once a row came
            self._layout = (query, {name: value for name, value in vars(wrapper).items()
                                    if name not in _PER_RESULT})
        return rows

    def _compile(self) -> tuple:
        compiled = self._compiled
        # Compiled for the database the model is bound to now (tests bind it to others).
        if compiled is not None and compiled[0].model._meta.database is compiled[0]._database:
            return compiled
        standins = [_standin(kind, i) for i, kind in enumerate(self._kinds)]
        query = self._build(*standins)
        sql, params = query.sql()
        slots = []
        for standin in standins:
            found = [i for i, p in enumerate(params) if type(p) is type(standin) and p == standin]
            if len(found) != 1:
                raise ValueError(f"a prepared argument must appear exactly once: {sql}")
            slots.append(found[0])
        self._compiled = (query, sql, params, slots)
        return self._compiled


# What peewee's cursor wrapper keeps about one result (its base class's own state: the
# cursor, counts, cached rows); the rest is the query and the column mapping.
_PER_RESULT = frozenset(vars(peewee.CursorWrapper(None)))


def _standin(kind: type, i: int):
    # Values no real argument or constant in a query takes.
    return -(2**62) - i if kind is int else f"\x00prepared-{i}\x00"
