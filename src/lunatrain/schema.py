"""The example store's tables as SQLAlchemy Core objects, for building queries in `store` and `export`.

They mirror `migrations/versions/*`: the Alembic migrations own the schema (create and upgrade it); a change
here without a migration is a bug.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
_HASH = sa.String(64).with_variant(sa.String(64, collation="C"), "postgresql")

examples_table = sa.Table(
    "examples",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("hash", _HASH, nullable=False, unique=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("system", sa.Text),
    sa.Column("turns", sa.JSON(none_as_null=True)),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("rating", sa.Integer),
    sa.Column("tags", sa.JSON(none_as_null=True)),
    sa.Column("conversation_id", sa.String(200)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)

memory_table = sa.Table(
    "memory_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("hash", _HASH, nullable=False, unique=True),
    sa.Column("topic", sa.String(200)),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("tags", sa.JSON(none_as_null=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)

deleted_table = sa.Table(
    "deleted_hashes",
    metadata,
    sa.Column("hash", _HASH, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
)

state_table = sa.Table(
    "store_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # drawn anew with every change (store._bump): with the counter, a revision no other state of any database has
    sa.Column("instance", sa.String(32), nullable=False),
    sa.Column("counter", sa.BigInteger, nullable=False),
)
