"""Alembic environment: migrate the connection `store.open_store()` hands over (already inside its locked
transaction), or, when run from the `alembic` command line, the database the settings point at."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from lunatrain.schema import metadata
from lunatrain.settings import load_settings

connection = context.config.attributes.get("connection")


def _run(conn) -> None:  # type: ignore[no-untyped-def]
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
    context.configure(connection=conn, target_metadata=metadata, render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    with create_engine(load_settings().database_url).begin() as conn:
        _run(conn)
