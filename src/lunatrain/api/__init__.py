"""The assistant API (FastAPI): `lunatrain serve`."""
