"""Property-based tests of the chat routes (/v1/models, /v1/chat/completions, /assistant/chat/examples)
against their own OpenAPI schema (schemathesis, in-process ASGI): every response is declared, matches its
schema, and none is a 5xx. The base model luna-tiny is served for real (the schema's examples name it), with
a small `max_tokens` cap so generated requests stay quick.

Run: `.venv/bin/python -m pytest tests/test_chat_schema.py -q` (well under a minute).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from lunatrain import models, store
from lunatrain.api.main import create_app
from lunatrain.settings import load_settings

MAX_EXAMPLES = 25

# Module level, not a fixture: schemathesis' lazy `from_fixture` loader breaks on pytest 9 (`_nodeid`).
_HOME = Path(tempfile.mkdtemp(prefix="lunatrain-chat-schema-"))
_SETTINGS = load_settings(
    home=_HOME, db_url=None, api_token=None, lora_ensure_on_demand=False, infer_max_tokens=8,
    allowed_hosts="127.0.0.1,localhost,testserver",  # schemathesis' ASGI client sends `Host: testserver`
)
_APP = create_app(_SETTINGS)
# Served model names as examples, so that generated requests reach real generation, not only 404s. Added to
# this test's copy of the schema only: the app-wide schema test would otherwise generate full answers too.
_APP.openapi()["components"]["schemas"]["ChatRequest"]["properties"]["model"]["examples"] = ["luna-tiny"]
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP).include(path_regex=r"^/(v1/|assistant/chat/)")


@pytest.fixture(scope="module", autouse=True)
def _tiny_and_cleanup():
    models.ensure_tiny(_SETTINGS)
    yield
    engine = getattr(_APP.state, "chat_engine", None)
    assert engine is not None and engine.generated > 0, "no generated request reached the model"
    store.dispose_stores()
    shutil.rmtree(_HOME, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_chat_routes_conform_and_never_fail(case) -> None:
    # positive_data_acceptance is off: a schema-valid model name may name no registered adapter (404), and
    # max_tokens over the configured cap is refused (400); neither rule fits in a static schema.
    response = case.call()
    if response.status_code == 413:
        assert response.json()["error"]["code"] == "payload_too_large"
        return
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500, response.text
    # The routes' own errors are OpenAI-shaped; a 405 comes from the app's router, before any route runs.
    if case.path.startswith("/v1/") and response.status_code >= 400 and response.status_code != 405:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
