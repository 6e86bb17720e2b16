"""Alembic migrations of the example store, shipped inside the package.

`store.open_store()` runs them programmatically (`alembic upgrade head` semantics) on first connect, so a
user's database survives upgrades of lunatrain. A new revision: copy `versions/0001_initial.py`, set
`down_revision` to the previous id, and write the schema change explicitly (never import the live tables).
"""
