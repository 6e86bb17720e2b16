"""Initial schema: examples, memory items, deleted-hash tombstones, store revision counter.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Hashes are compared and ordered byte-wise everywhere (export merges sorted streams in Python), so on
# PostgreSQL the column uses the "C" collation whatever the database default is.
HASH = sa.String(64).with_variant(sa.String(64, collation="C"), "postgresql")
STATUS_CHECK = "status IN ('approved', 'pending', 'rejected')"


def upgrade() -> None:
    op.create_table(
        "examples",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("hash", HASH, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("system", sa.Text, nullable=True),
        sa.Column("turns", sa.JSON, nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("rating", sa.Integer, nullable=True),
        sa.Column("tags", sa.JSON, nullable=True),
        sa.Column("conversation_id", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("hash", name="uq_examples_hash"),
        sa.CheckConstraint("source IN ('curated', 'memory', 'conversation')", name="ck_examples_source"),
        sa.CheckConstraint(STATUS_CHECK, name="ck_examples_status"),
        sa.CheckConstraint("rating IS NULL OR (rating >= 1 AND rating <= 5)", name="ck_examples_rating"),
        # AUTOINCREMENT: ids of deleted rows are never handed out again (stable ids in exports and logs).
        sqlite_autoincrement=True,
    )
    # Export reads "approved, ordered by hash"; listing and counts filter by source and status.
    op.create_index("ix_examples_status_hash", "examples", ["status", "hash"])
    op.create_index("ix_examples_source_status", "examples", ["source", "status", "id"])
    op.create_index("ix_examples_conversation", "examples", ["conversation_id"])

    op.create_table(
        "memory_items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("hash", HASH, nullable=False),
        sa.Column("topic", sa.String(200), nullable=True),
        sa.Column("question", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tags", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("hash", name="uq_memory_items_hash"),
        sa.CheckConstraint(STATUS_CHECK, name="ck_memory_items_status"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_memory_items_status_hash", "memory_items", ["status", "hash"])

    op.create_table(
        "deleted_hashes",
        sa.Column("hash", HASH, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
    )

    state = op.create_table(
        "store_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("instance", sa.String(32), nullable=False),
        sa.Column("counter", sa.BigInteger, nullable=False),
    )
    # The instance id keeps revisions of two different databases from ever comparing equal.
    op.bulk_insert(state, [{"id": 1, "instance": uuid.uuid4().hex, "counter": 0}])


def downgrade() -> None:
    for table in ("store_state", "deleted_hashes", "memory_items", "examples"):
        op.drop_table(table)
