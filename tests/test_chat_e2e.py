"""The chat endpoint through the official `openai` client against a real `lunatrain serve` process: adapters
trained on luna-tiny to memorise a few answers give them through `model="luna-adapter"` (plain and streamed),
the base model does not, and activating another version changes the next answer without a restart.

Run: `.venv/bin/python -m pytest tests/test_chat_e2e.py -q` (slow: two short trainings and a server, ~1 min).
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from chat_helpers import FACTS_A, FACTS_B, train_facts

from lunatrain import registry
from lunatrain.settings import load_settings

from dashboard_helpers import Services, running_services

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Services, dict[str, str]]]:
    home = tmp_path_factory.mktemp("chat-home")
    settings = load_settings(home=home)
    versions = {"a": train_facts(settings, FACTS_A), "b": train_facts(settings, FACTS_B)}
    registry.activate(settings, "luna-adapter", versions["a"])
    with running_services(home) as svc:
        yield svc, versions


@pytest.fixture
def client(served) -> Iterator[openai.OpenAI]:
    svc, _ = served
    # The first answer loads torch, transformers, PEFT and the model: ~30 s on busy shared cores.
    with openai.OpenAI(base_url=svc.api_url + "/v1", api_key="unused", max_retries=0, timeout=600) as c:
        yield c


def ask(client: openai.OpenAI, model: str, question: str, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **({"temperature": 0, "max_tokens": 24} | kw)
    )


def ask_streamed(client: openai.OpenAI, model: str, question: str) -> tuple[str, list]:
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_lists_the_base_the_active_adapter_and_each_version(client, served) -> None:
    _, v = served
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "luna-tiny"
    assert {"luna-adapter", f"luna-adapter@{v['a']}", f"luna-adapter@{v['b']}"} <= set(ids)


def test_the_active_adapter_answers_what_it_learned_and_the_base_does_not(client, served) -> None:
    _, v = served
    for question, answer in FACTS_A:
        reply = ask(client, "luna-adapter", question)
        assert reply.choices[0].message.content == answer
        assert reply.choices[0].finish_reason == "stop"
        assert reply.model == f"luna-adapter@{v['a']}"
        assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 24
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

        base = ask(client, "luna-tiny", question)
        assert base.model == "luna-tiny"
        assert answer not in (base.choices[0].message.content or "")


def test_streamed_answers_arrive_in_pieces_in_the_clients_chunk_format(client, served) -> None:
    _, v = served
    question, answer = FACTS_A[0]
    text, chunks = ask_streamed(client, "luna-adapter", question)
    assert text == answer
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # token by token, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert {c.model for c in chunks} == {f"luna-adapter@{v['a']}"}


def test_activating_another_version_is_used_by_the_next_request_without_restart(client, served) -> None:
    svc, v = served
    settings = load_settings(home=svc.home)
    question = FACTS_A[1][0]
    assert ask(client, "luna-adapter", question).choices[0].message.content == FACTS_A[1][1]
    pid = svc.proc.pid
    registry.activate(settings, "luna-adapter", v["b"])
    try:
        reply = ask(client, "luna-adapter", question)
        assert reply.choices[0].message.content == FACTS_B[1][1]
        assert reply.model == f"luna-adapter@{v['b']}"
        text, _ = ask_streamed(client, "luna-adapter", FACTS_B[2][0])
        assert text == FACTS_B[2][1]
        # a version by name, whatever is active
        assert ask(client, f"luna-adapter@{v['a']}", question).choices[0].message.content == FACTS_A[1][1]
        assert svc.proc.pid == pid and svc.proc.poll() is None  # the same server process throughout
    finally:
        registry.activate(settings, "luna-adapter", v["a"])


def test_sampling_options_stop_seed_and_length(client, served) -> None:
    question, answer = FACTS_A[0]
    cut = ask(client, "luna-adapter", question, stop=["heißt"])
    assert cut.choices[0].message.content == answer.split("heißt")[0]
    assert cut.choices[0].finish_reason == "stop"

    short = ask(client, "luna-tiny", question, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

    def sampled(seed: int) -> str:
        return (
            client.chat.completions.create(
                model="luna-tiny",
                messages=[{"role": "user", "content": question}],
                temperature=1.5,
                top_p=0.95,
                seed=seed,
                max_tokens=16,
            )
            .choices[0]
            .message.content
        )

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in (1, 2, 3)}) > 1  # the seed matters: random weights make answers vary


def test_errors_come_in_openais_shape_through_the_client(client) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, "no-such-adapter", "Hallo?")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as too_many:
        ask(client, "luna-tiny", "Hallo?", max_tokens=10**6)
    assert too_many.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="luna-tiny", messages=[])
    with pytest.raises(openai.BadRequestError) as json_mode:  # refused, not answered in prose
        ask(client, "luna-tiny", "Hallo?", response_format={"type": "json_object"})
    assert json_mode.value.body["param"] == "response_format" and json_mode.value.body["code"] == "unsupported_value"
    penalised = ask(client, "luna-tiny", "Hallo?", max_tokens=4, presence_penalty=0.5, frequency_penalty=0.5)
    assert penalised.usage.completion_tokens <= 4
