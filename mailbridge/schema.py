"""Schema versions: each migration is a function applied once, in order, by `db upgrade`."""

from __future__ import annotations

from collections.abc import Callable

import peewee

from mailbridge import models


def _v1_initial(db: peewee.Database) -> None:
    db.create_tables([m for m in models.ALL_MODELS if m is not models.SchemaVersion])


MIGRATIONS: list[tuple[int, str, Callable[[peewee.Database], None]]] = [
    (1, "initial tables", _v1_initial),
]
LATEST = MIGRATIONS[-1][0]


def current_version(db: peewee.Database) -> int:
    if not models.SchemaVersion.table_exists():
        return 0
    row = models.SchemaVersion.select(peewee.fn.MAX(models.SchemaVersion.version)).scalar()
    return row or 0


def upgrade(db: peewee.Database, now) -> list[str]:
    """Apply pending migrations; returns their descriptions. Safe to run repeatedly."""
    applied = []
    with db.atomic():
        db.create_tables([models.SchemaVersion], safe=True)
        version = current_version(db)
        for number, description, apply in MIGRATIONS:
            if number > version:
                apply(db)
                models.SchemaVersion.create(version=number, applied_at=now)
                applied.append(f"{number}: {description}")
    return applied
