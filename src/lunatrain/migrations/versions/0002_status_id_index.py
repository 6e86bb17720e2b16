"""Listing by status in id order without sorting every matching row: an index on (status, id).

`examples list --status approved` (and `GET /examples?status=`) ordered by id had only (status, hash) and
(source, status, id) to use, so each page sorted every row of that status: a page took seconds at some
hundred thousand examples, paging through them minutes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_examples_status_id", "examples", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_examples_status_id", table_name="examples")
