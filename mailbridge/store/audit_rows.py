"""The audit chain's hot path: an event's canonical bytes and MAC built from templates rather
than generic serialisation, and events inserted in bulk (executemany on SQLite, COPY on
PostgreSQL) — so a job can chain and write a million events in seconds."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import operator
from collections.abc import Sequence

import peewee

REFS = ("share", "grant", "document", "member", "account", "inbound", "clinic")
# The stored columns in insert order; `detail` is the JSON text the model's field writes.
COLUMNS = ("seq", "mac", "at", "kind", "actor", "share_id", "grant_id", "document_id",
           "member_id", "account_id", "inbound_id", "clinic_id", "ip", "user_agent", "detail")
# The canonical form's keys in their (sorted) order; it must stay byte for byte what
# `json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)` gives,
# which is what chains written before this module were linked over.
KEYS = tuple(sorted(("seq", "at", "kind", "actor", "ip", "user_agent", "detail", *REFS)))
INSERT_PAGE = 20_000  # rows per INSERT statement on SQLite

_text = json.encoder.encode_basestring_ascii  # a JSON string, as json.dumps writes it


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def stored_json(value) -> str:
    """What the model's JSONField writes for `detail`."""
    return json.dumps(value, sort_keys=True)


def at_text(at: dt.datetime) -> str:
    return at.isoformat(timespec="microseconds")


def canonical(row: dict) -> bytes:
    """What an event's MAC covers (its stored fields as a dict), byte for byte the same
    whichever database stored it."""
    values = {"seq": str(int(row["seq"])), "at": _text(at_text(row["at"])),
              "kind": _text(str(row["kind"])), "actor": _text(row.get("actor") or ""),
              "ip": _text(row.get("ip") or ""), "user_agent": _text(row.get("user_agent") or ""),
              "detail": canonical_json(row.get("detail") or {})}
    for ref in REFS:
        values[ref] = _number(row.get(ref))
    return ("{" + ",".join(f'"{key}":{values[key]}' for key in KEYS) + "}").encode()


class Template:
    """Events that share kind, time, actor, ip, user agent and (unless given per event) detail,
    and differ in their refs: `varying` names those refs (in the order each event's tuple
    gives them), `per_event_detail` adds the detail dict as the tuple's last item."""

    def __init__(self, *, kind: str, at: dt.datetime, actor: str = "", ip: str = "",
                 user_agent: str = "", detail: dict | None = None,
                 varying: Sequence[str] = ("share", "grant"), fixed: dict | None = None,
                 per_event_detail: bool = False) -> None:
        fixed = dict(fixed or {})
        unknown = (set(varying) | set(fixed)) - set(REFS)
        if unknown:
            raise TypeError(f"unknown audit fields: {sorted(unknown)}")
        self.varying = tuple(varying)
        self.per_event_detail = per_event_detail
        constant = {"at": _text(at_text(at)), "kind": _text(str(kind)), "actor": _text(actor),
                    "ip": _text(ip), "user_agent": _text(user_agent),
                    "detail": canonical_json(detail or {})}
        for ref in REFS:
            if ref not in self.varying:
                constant[ref] = _number(fixed.get(ref))
        slots = [*self.varying, "seq"] + (["detail"] if per_event_detail else [])
        parts, self.order = [], []
        for i, key in enumerate(KEYS):
            parts.append(("{" if i == 0 else ",") + f'"{key}":')
            if key in slots:
                parts.append("%s")
                self.order.append(slots.index(key))
            else:
                parts.append(constant[key].replace("%", "%%"))
        self.format = "".join(parts) + "}"
        # Stored: the columns each event gives (see `chain`), and the rest, the same for all.
        self.columns = ("seq", "mac", *(f"{ref}_id" for ref in self.varying),
                        *(("detail",) if per_event_detail else ()))
        self.constants = {"at": at, "kind": str(kind), "actor": actor, "ip": ip,
                          "user_agent": user_agent,
                          **({} if per_event_detail else {"detail": stored_json(detail or {})}),
                          **{f"{ref}_id": _id(fixed.get(ref)) for ref in REFS
                             if ref not in self.varying}}

    def canonical(self, values: tuple, seq: int) -> bytes:
        """`values`: the varying refs (then the detail, if per event)."""
        if self.per_event_detail:
            args = (*(_number(v) for v in values[:-1]), seq, canonical_json(values[-1] or {}))
        else:
            args = (*(_number(v) for v in values), seq)
        return (self.format % tuple(args[i] for i in self.order)).encode()


def _id(value) -> int | None:
    if value is None:
        return None
    return int(getattr(value, "id", value))


def _number(value) -> str:
    if value is None:
        return "null"
    return str(int(getattr(value, "id", value)))


def keyed_states(key: bytes) -> tuple:
    """HMAC-SHA256 (RFC 2104) with its two keyed SHA-256 states computed once: each MAC is
    then two state copies, no key schedule and no Python-level HMAC object."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in key)),
            hashlib.sha256(bytes(b ^ 0x5C for b in key)))


def chain(key: bytes, mac: str, seq: int, template: Template,
          events: Sequence[tuple]) -> tuple[list[tuple], int, str]:
    """MAC each event after (`seq`, `mac`); returns the rows (`template.columns`) and the new
    head. The loop is the hot path: the canonical text is one %-format, the MAC two copies
    of keyed SHA-256 states."""
    inner, outer = keyed_states(key)
    fmt, per_event_detail = template.format, template.per_event_detail
    arrange = operator.itemgetter(*template.order)  # (values..., seq) -> the format's order
    rows = []
    append = rows.append
    for values in events:
        seq += 1
        if not per_event_detail and None not in values:
            text = fmt % arrange((*values, seq))
        else:
            text = template.canonical(values, seq).decode()
        h = inner.copy()
        h.update(f"{mac}\0{text}".encode())
        o = outer.copy()
        o.update(h.digest())
        mac = o.hexdigest()
        if per_event_detail:
            append((seq, mac, *values[:-1], stored_json(values[-1] or {})))
        else:
            append((seq, mac, *values))
    return rows, seq, mac


def insert(db: peewee.Database, columns: Sequence[str], rows: list[tuple],
           constants: dict | None = None) -> None:
    """Insert rows (values for `columns`; `constants` the same for every row) in the caller's
    transaction: on SQLite one statement per page reading a JSON array (binding values one
    by one costs more than SQLite's own work), on PostgreSQL COPY."""
    if not rows:
        return
    constants = constants or {}
    if isinstance(db, peewee.PostgresqlDatabase):
        _copy(db, columns, rows, constants)
        return
    names = ", ".join(f'"{c}"' for c in (*columns, *constants))
    picks = ", ".join([f"json_extract(value, '$[{i}]')" for i in range(len(columns))]
                      + ["?"] * len(constants))
    sql = (f'INSERT INTO "audit_event" ({names}) '  # noqa: S608 - fixed column names
           f"SELECT {picks} FROM json_each(?)")
    fixed = [_sqlite_value(v) for v in constants.values()]
    for start in range(0, len(rows), INSERT_PAGE):
        page = json.dumps(rows[start:start + INSERT_PAGE], default=_sqlite_value,
                          ensure_ascii=False)
        db.execute_sql(sql, (*fixed, page))


def _sqlite_value(value):
    # Times as peewee writes them on SQLite (the str of the datetime).
    return str(value) if isinstance(value, dt.datetime) else value


def _copy(db: peewee.Database, columns: Sequence[str], rows: list[tuple],
          constants: dict) -> None:
    """COPY ... FROM STDIN in text format: the fastest way into PostgreSQL. Constant columns
    are escaped once; so is each distinct value of the others."""
    suffix = "".join("\t" + _copy_field(v) for v in constants.values()) + "\n"
    memo: dict = {None: "\\N"}
    lines = []
    for row in rows:
        fields = [str(row[0]), row[1]]  # seq, mac (hex: nothing to escape)
        for value in row[2:]:
            if type(value) is int:
                fields.append(str(value))
                continue
            text = memo.get(value)
            if text is None:
                text = memo[value] = _copy_field(value)
            fields.append(text)
        lines.append("\t".join(fields) + suffix)
    names = ", ".join(f'"{c}"' for c in (*columns, *constants))
    db.cursor().copy_expert(f'COPY "audit_event" ({names}) FROM STDIN',
                            io.StringIO("".join(lines)))


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field(value) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return value.translate(_COPY_ESCAPES)
    if isinstance(value, dt.datetime):
        return value.isoformat(" ")
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(int(getattr(value, "id", value)))


# --- reading the chain back (verify) --------------------------------------------------------

STORED = ("id", "seq", "mac", "at", "kind", "actor", "ip", "user_agent", "detail",
          *(f"{ref}_id" for ref in REFS))
READ_PAGE = 5000
_ORDER = ("account", "actor", "at", "clinic", "detail", "document", "grant", "inbound", "ip",
          "kind", "member", "seq", "share", "user_agent")
assert _ORDER == KEYS  # noqa: S101 - the f-string in `stored_canonical` spells this order


def stored_rows(db: peewee.Database, since_seq: int):
    """Events as the driver returns them (STORED order), in chain order from `since_seq`, a
    page at a time: no model objects, no per-field conversion."""
    names = ", ".join(f'"{c}"' for c in STORED)
    last = since_seq - 1
    while True:
        page = db.execute_sql(f'SELECT {names} FROM "audit_event" '  # noqa: S608
                              f'WHERE "seq" > {db.param} ORDER BY "seq" LIMIT {READ_PAGE}',
                              (last,)).fetchall()
        yield from page
        if len(page) < READ_PAGE:
            return
        last = page[-1][1]


def stored_canonical(row: tuple, memo: dict) -> tuple[dt.datetime, bytes] | None:
    """(time, canonical bytes) of a row from `stored_rows`; None if a value cannot be read
    back at all (written around the application). `memo` caches times and details, which
    events of one batch share."""
    _id, seq, _mac, at, kind, actor, ip, user_agent, detail, *refs = row
    try:
        when = memo.get(("at", at))
        if when is None:
            moment = at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(at)
            when = memo[("at", at)] = (moment, _text(at_text(moment)))
        text = memo.get(("detail", detail))
        if text is None:
            loaded = json.loads(detail) if detail is not None else None
            text = memo[("detail", detail)] = canonical_json(loaded or {})
        share, grant, document, member, account, inbound, clinic = (
            "null" if ref is None else str(int(ref)) for ref in refs)
        canonical = (
            f'{{"account":{account},"actor":{_text(actor or "")},"at":{when[1]},'
            f'"clinic":{clinic},"detail":{text},"document":{document},"grant":{grant},'
            f'"inbound":{inbound},"ip":{_text(ip or "")},"kind":{_text(str(kind))},'
            f'"member":{member},"seq":{int(seq)},"share":{share},'
            f'"user_agent":{_text(user_agent or "")}}}')
    except (TypeError, ValueError):
        return None
    return when[0], canonical.encode()


def mac_of(states: tuple, previous_mac: str, canonical: bytes) -> str:
    """The MAC `audit.link` computes, from `keyed_states`."""
    inner, outer = states[0].copy(), states[1].copy()
    inner.update(previous_mac.encode() + b"\0" + canonical)
    outer.update(inner.digest())
    return outer.hexdigest()
