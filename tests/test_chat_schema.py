"""Property-based tests of the chat routes (/v1/models, /v1/chat/completions, /assistant/chat/examples)
against their own OpenAPI schema (schemathesis, in-process ASGI): every response is declared, matches its
schema, and none is a 5xx. The base model luna-tiny is served for real (the schema's examples name it), with
a small `max_tokens` cap so generated requests stay quick.

Run: `.venv/bin/python -m pytest tests/test_chat_schema.py -q` (well under a minute).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from schemathesis.specs.openapi.checks import positive_data_acceptance

from lunatrain import models, store
from lunatrain.api.main import create_app
from lunatrain.settings import load_settings

from schema_helpers import call, drive, operations

MAX_EXAMPLES = 25
CHAT_PATHS = r"^/(v1/|assistant/chat/)"

# The schema of an app built with default settings (no side effects), with the served model's name as the
# example, so that generated requests reach real generation, not only 404s. Added to this test's copy of the
# schema only: the app-wide schema test would otherwise generate full answers too.
SPEC = create_app(load_settings(api_token=None)).openapi()
SPEC["components"]["schemas"]["ChatRequest"]["properties"]["model"]["examples"] = ["luna-tiny"]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    settings = load_settings(
        home=tmp_path_factory.mktemp("chat-schema-home"),
        db_url=None,
        api_token=None,
        lora_ensure_on_demand=False,
        infer_max_tokens=8,
        allowed_hosts="127.0.0.1,localhost,testserver",  # schemathesis' ASGI client sends `Host: testserver`
    )
    models.ensure_tiny(settings)
    try:
        yield create_app(settings)
    finally:
        store.dispose_stores()


@pytest.mark.parametrize(("path", "method"), operations(SPEC, CHAT_PATHS), ids=lambda v: v)
def test_chat_routes_conform_and_never_fail(path: str, method: str, app) -> None:
    assert drive(SPEC, path, method, lambda case: _check(case, app), MAX_EXAMPLES) > 0
    if (path, method) == ("/v1/chat/completions", "POST"):
        # Generated model names rarely name the served model; requests naming it, plain and streamed, reach
        # real generation and must conform the same way.
        import schemathesis

        operation = schemathesis.openapi.from_dict(SPEC)[path][method]
        for stream in (False, True):
            body = {"model": "luna-tiny", "messages": [{"role": "user", "content": "Hallo"}], "stream": stream}
            _check(operation.Case(body=body, media_type="application/json"), app)
        engine = getattr(app.state, "chat_engine", None)
        assert engine is not None and engine.generated > 0, "no generated request reached the model"


def _check(case, app) -> None:
    # positive_data_acceptance is off: a schema-valid model name may name no registered adapter (404), and
    # max_tokens over the configured cap is refused (400); neither rule fits in a static schema.
    response = call(case, app)
    if response.status_code == 413:
        assert response.json()["error"]["code"] == "payload_too_large"
        return
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500, response.text
    # The routes' own errors are OpenAI-shaped; a 405 comes from the app's router, before any route runs.
    if case.path.startswith("/v1/") and response.status_code >= 400 and response.status_code != 405:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
