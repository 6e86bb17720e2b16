"""Reading OpenAI / ShareGPT / Alpaca / prompt-response records from JSONL, JSON and CSV files, and the
errors for bad files (each naming file, line and field, and importing nothing).

Run: `.venv/bin/python -m pytest tests/test_formats.py -q`
"""

from __future__ import annotations

import codecs
import json
import random
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from lunatrain import store
from lunatrain.errors import UsageError
from lunatrain.formats import ExampleDraft, RecordError, content_hash, make_draft, read_file
from lunatrain.settings import Settings


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    store.dispose_stores()


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def test_every_shape_in_one_jsonl_file(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Du bist Luna."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hallo!"},
                ],
                "tags": ["a"],
                "rating": 4,
            },
            {
                "conversations": [{"from": "human", "value": "Wer bist du?"}, {"from": "gpt", "value": "Luna."}],
                "conversation_id": "c1",
            },
            {"instruction": "Übersetze.", "input": "Hallo", "output": "Hello"},
            {"instruction": "Sag Hallo.", "output": "Hallo!"},
            {"prompt": "2+2?", "response": "4", "system": "Kurz antworten.", "tags": "math, kurz"},
        ],
    )
    parsed = read_file(path)
    assert parsed.formats == {"openai": 1, "sharegpt": 1, "alpaca": 2, "prompt-response": 1}
    d = parsed.drafts
    assert (d[0].system, d[0].prompt, d[0].response, d[0].tags, d[0].rating) == (
        "Du bist Luna.",
        "Hi",
        "Hallo!",
        ("a",),
        4,
    )
    assert (d[1].prompt, d[1].response, d[1].conversation_id) == ("Wer bist du?", "Luna.", "c1")
    assert d[2].prompt == "Übersetze.\n\nHallo" and d[2].response == "Hello"
    assert d[3].prompt == "Sag Hallo."
    assert (d[4].system, d[4].tags) == ("Kurz antworten.", ("kurz", "math"))


def test_multi_turn_split_into_prior_turns_prompt_and_response(tmp_path: Path) -> None:
    msgs = [
        {"from": "system", "value": "Sei Luna."},
        {"from": "human", "value": "Plan meinen Tag."},
        {"from": "gpt", "value": "Welche Termine hast du?"},
        {"from": "human", "value": "Meeting um 9."},
        {"from": "gpt", "value": "Dann Fokuszeit ab 10."},
        {"from": "human", "value": "Danke!"},  # no answer: dropped, not trained on
    ]
    (draft,) = read_file(_jsonl(tmp_path / "conv.jsonl", [{"conversations": msgs}])).drafts
    assert draft.system == "Sei Luna."
    assert draft.turns == (("user", "Plan meinen Tag."), ("assistant", "Welche Termine hast du?"))
    assert (draft.prompt, draft.response) == ("Meeting um 9.", "Dann Fokuszeit ab 10.")


def test_json_array_and_csv(tmp_path: Path) -> None:
    arr = tmp_path / "data.json"
    arr.write_text(
        json.dumps([{"prompt": "a", "response": "b"}, {"instruction": "c", "output": "d"}]), encoding="utf-8"
    )
    assert [x.prompt for x in read_file(arr).drafts] == ["a", "c"]
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(
        'prompt,response,tags,rating,conversation_id\n"Hallo, Luna",Hallo!,greeting;seed,5,c7\n"Multi\nline",ok,,,\n',
        encoding="utf-8",
    )
    a, b = read_file(csv_path).drafts
    assert (a.prompt, a.tags, a.rating, a.conversation_id) == ("Hallo, Luna", ("greeting", "seed"), 5, "c7")
    assert b.prompt == "Multi\nline" and b.rating is None
    msgs_csv = tmp_path / "msgs.csv"
    msgs_csv.write_text(
        'messages\n"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": ""Hey""}]"\n',
        encoding="utf-8",
    )
    assert read_file(msgs_csv).drafts[0].response == "Hey"


def test_forced_format_rejects_other_shapes(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "a", "response": "b"}])
    assert read_file(path, "prompt-response").formats == {"prompt-response": 1}
    with pytest.raises(UsageError, match="line 1: field 'messages': missing"):
        read_file(path, "openai")
    with pytest.raises(UsageError, match="Unknown format 'chatml'"):
        read_file(path, "chatml")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "malformed.jsonl",
            b'{"prompt": "a", "response": "b"}\n{"prompt": "a",\n',
            r"malformed\.jsonl: 1 bad record.*line 2: malformed JSON",
        ),
        (
            "missing.jsonl",
            b'{"prompt": "a", "response": "b"}\n\n{"prompt": "x"}\n',
            r"missing\.jsonl.*line 3: field 'response': missing",
        ),
        (
            "types.jsonl",
            b'{"prompt": "a", "response": ["b"]}\n',
            r"types\.jsonl.*line 1: field 'response': expected a string, got list",
        ),
        (
            "rating.jsonl",
            b'{"prompt": "a", "response": "b", "rating": "great"}\n',
            r"line 1: field 'rating': expected a whole number",
        ),
        (
            "role.jsonl",
            b'{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
            r"line 1: field 'messages\[1\]\.role': unsupported role 'robot'",
        ),
        (  # was "expected a string, got list", although text parts are taken: name the part that is not
            "image.jsonl",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "Was ist das?"}, '
            b'{"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "Ein Bild."}]}\n',
            r"line 1: field 'messages\[0\]\.content\[1\]\.type': 'image_url' parts cannot be trained on; only text parts",
        ),
        (
            "part.jsonl",
            b'{"prompt": [{"type": "text", "text": "a"}, "b"], "response": "c"}\n',
            r"line 1: field 'prompt\[1\]': expected a content part \(an object with a type\), got string",
        ),
        (
            "noanswer.jsonl",
            b'{"messages": [{"role": "user", "content": "a"}]}\n',
            r"line 1: field 'messages': no assistant turn",
        ),
        ("empty.jsonl", b"\n  \n", r"empty\.jsonl: the file is empty"),
        (
            "latin1.jsonl",
            '{"prompt": "a", "response": "b"}\n{"prompt": "Grüße", "response": "b"}\n'.encode("latin-1"),
            r"latin1\.jsonl: line 2 is not valid UTF-8 \(byte 0xfc\)",
        ),
        ("unknown.jsonl", b'{"question": "a", "answer": "b"}\n', r"unknown\.jsonl.*line 1: unknown format"),
        (
            "array.json",
            b'[{"prompt": "a", "response": "b"}, {"prompt": 1, "response": "b"}]',
            r"array\.json.*record 2: field 'prompt': expected a string, got number",
        ),
        ("broken.json", b'[{"prompt": "a",\n "response": }]', r"broken\.json.*line 2: malformed JSON"),
        ("bad.csv", b"prompt,response\nhello,\n", r"bad\.csv.*line 2: field 'response': missing"),
        (
            "latin1.csv",
            ("prompt;response\na;b\n" + "c;d\n" * 5000 + "Grüße;b\n").encode("latin-1"),  # read in chunks
            r"latin1\.csv: line 5003 is not valid UTF-8 \(byte 0xfc\)",
        ),
        ("cr.csv", b"prompt;response\rhello;\r", r"cr\.csv.*line 2: field 'response': missing"),
        (
            "invisible.jsonl",  # a zero-width space, a word joiner and a right-to-left mark: nothing to read
            '{"prompt": "\u200b \u2060\u200f", "response": "Ja."}\n'.encode(),
            r"line 1: field 'prompt': shows nothing \(only invisible characters",
        ),
        ("data.txt", b"prompt: a\n", r"data\.txt: unknown file type '\.txt'"),
    ],
)
def test_bad_file_names_file_line_field_and_imports_nothing(
    settings: Settings, tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    store.add_example(settings, prompt="schon da", response="bleibt")
    before = (store.revision(settings), store.counts(settings))
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UsageError, match=expected) as info:
        store.import_file(settings, path)
    assert "Nothing was imported" in info.value.message or "unknown file type" in info.value.message
    assert (store.revision(settings), store.counts(settings)) == before


def test_all_problems_are_collected(tmp_path: Path) -> None:
    records = [{"prompt": "ok", "response": "ok"}] + [{"prompt": f"p{i}"} for i in range(7)]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "many.jsonl", records))
    assert "7 bad records" in info.value.message and "(and 2 more)" in info.value.message
    assert len(info.value.details) == 7
    assert info.value.details[-1] == "many.jsonl line 8: field 'response': missing"


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="file not found"):
        read_file(tmp_path / "nope.jsonl")


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip() != ""
)


@hsettings(max_examples=60, deadline=None)
@given(prompt=_text, response=_text, pad=st.sampled_from(["", " ", "\n", "\t "]))
def test_hash_ignores_unicode_form_and_surrounding_whitespace(prompt: str, response: str, pad: str) -> None:
    nfc = content_hash(None, (), prompt, response)
    # Before a text of several lines only whole blank lines are surrounding: its first line keeps its indent.
    lead = pad if "\n" not in prompt.strip() else pad + "\n" if pad else ""
    variant = content_hash(
        "", (), lead + unicodedata.normalize("NFD", prompt) + pad, unicodedata.normalize("NFD", response) + pad
    )
    assert nfc == variant


def test_the_first_line_of_several_keeps_its_indent_in_the_hash() -> None:
    assert content_hash(None, (), "q", "    x\n    y") != content_hash(None, (), "q", "x\n    y")
    assert content_hash(None, (), "q", " \n    x\n    y\n") == content_hash(None, (), "q", "    x\n    y")


def test_hash_separates_fields() -> None:
    assert content_hash(None, (), "ab", "c") != content_hash(None, (), "a", "bc")
    assert content_hash("s", (), "p", "r") != content_hash(None, (), "p", "r")
    assert content_hash(None, (("user", "x"),), "p", "r") != content_hash(None, (("assistant", "x"),), "p", "r")
    assert ExampleDraft("p", "r").hash == content_hash(None, (), "p", "r")


@pytest.mark.parametrize(
    "record",
    [
        {
            "messages": [
                {"role": "system", "content": ""},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hallo"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": " \n"},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hallo"},
            ]
        },
        {
            "conversations": [
                {"from": "system", "value": ""},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hallo"},
            ]
        },
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hallo"}], "system": ""},
        # no content parts at all: no text, as an empty string
        {
            "messages": [
                {"role": "system", "content": []},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hallo"},
            ]
        },
    ],
)
def test_empty_system_turn_means_no_system_prompt(tmp_path: Path, record: dict) -> None:
    # Chat exports often carry an empty system turn; the flat shapes already read "system": "" as none.
    (draft,) = read_file(_jsonl(tmp_path / "chat.jsonl", [record])).drafts
    (flat,) = read_file(_jsonl(tmp_path / "flat.jsonl", [{"prompt": "Hi", "response": "Hallo", "system": ""}])).drafts
    assert (draft.system, draft.prompt, draft.response) == (None, "Hi", "Hallo")
    assert draft.hash == flat.hash


def test_empty_user_or_assistant_turn_is_still_refused(tmp_path: Path) -> None:
    records = [
        {
            "messages": [
                {"role": "system", "content": ""},
                {"role": "user", "content": ""},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
    ]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "empty.jsonl", records))
    assert info.value.details == [
        "empty.jsonl line 1: field 'messages[1].content': is empty",
        "empty.jsonl line 2: field 'conversations[1].value': is empty",
    ]


def test_turn_errors_name_the_index_in_the_records_own_list(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Sei Luna."}
    records = [
        {"messages": [system, {"role": "user", "content": "Hi"}, system, {"role": "assistant", "content": "a"}]},
        {"messages": [system, {"role": "assistant", "content": "a"}]},
    ]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "turns.jsonl", records))
    assert info.value.details == [
        "turns.jsonl line 1: field 'messages[2]': a system message is only allowed first",
        "turns.jsonl line 2: field 'messages[1]': the last assistant turn must follow a user turn",
    ]
    # A record-level ShareGPT system prompt is used when the list has none, and the list's own one wins.
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hallo"}]
    own = [{"from": "system", "value": "Eigener."}, *conv]
    a, b = read_file(
        _jsonl(
            tmp_path / "sg.jsonl", [{"conversations": conv, "system": "Top."}, {"conversations": own, "system": "Top."}]
        )
    ).drafts
    assert (a.system, b.system) == ("Top.", "Eigener.")
    # Repro: an empty leading system turn (what converters write) dropped the record's own system prompt
    # without a word; an empty turn says nothing, so the record's prompt stands.
    empty = [{"from": "system", "value": ""}, *conv]
    c, d = read_file(
        _jsonl(tmp_path / "sg2.jsonl", [{"conversations": empty, "system": "Top."}, {"conversations": empty}])
    ).drafts
    assert (c.system, d.system) == ("Top.", None)


def test_a_tool_call_conversation_is_named_as_one(tmp_path: Path) -> None:
    """Repro: an OpenAI conversation with a tool call was refused as "field 'messages[1].content': missing"
    (a tool-call message has no content), a ShareGPT one as "unsupported role 'function_call'": nothing said
    that tool turns are what lunatrain cannot train, nor how to import the rest."""
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    records = [
        {
            "messages": [
                {"role": "user", "content": "Wie ist das Wetter?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sonnig"},
                {"role": "assistant", "content": "Es ist sonnig."},
            ]
        },
        {"messages": [{"role": "user", "content": "Wetter?"}, {"role": "tool", "content": "{}"}]},
        {
            "conversations": [
                {"from": "human", "value": "Wetter?"},
                {"from": "function_call", "value": "{}"},
                {"from": "observation", "value": "sonnig"},
                {"from": "gpt", "value": "Sonnig."},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "function_call": {}}]},
    ]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "tools.jsonl", records))
    said = "; lunatrain trains on text turns only: leave such conversations out, or import with --skip-bad"
    assert info.value.details == [
        f"tools.jsonl line 1: field 'messages[1]': a tool call{said}",
        f"tools.jsonl line 2: field 'messages[1]': a tool result{said}",
        f"tools.jsonl line 3: field 'conversations[1]': a tool call{said}",
        f"tools.jsonl line 4: field 'messages[1]': a tool call{said}",
    ]
    # a plain answer that only carries the keys empty, as some exports write them, is no tool call
    plain = {"role": "assistant", "content": "Hallo.", "tool_calls": [], "function_call": None}
    (draft,) = read_file(_jsonl(tmp_path / "plain.jsonl", [{"messages": [records[1]["messages"][0], plain]}])).drafts
    assert draft.response == "Hallo."


def test_tool_use_beside_the_turns_is_refused_as_a_tool_turn_is(tmp_path: Path) -> None:
    """Tool-call explore repros: a prompt-response record's `turns` with `tool_calls` or `function_call` were
    imported with the call dropped, and the turn that made it ("Let me check.") trained as a finished answer
    (POST /examples refused the same turns); a record's own `tool_calls`, and the `tools`/`functions` a
    conversation was given (OpenAI's lists, LLaMA-Factory's string), were dropped without a word, so its answers
    trained on tools the served model is never given."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    plain = [{"role": "user", "content": "Wetter in Berlin?"}, {"role": "assistant", "content": "Es ist sonnig."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    records = [
        {
            "prompt": "Und jetzt?",
            "response": "12 Grad.",
            "turns": [
                {"role": "user", "content": "Wetter?"},
                {"role": "assistant", "content": "Ich schaue nach.", "tool_calls": [call]},
            ],
        },
        {
            "prompt": "Und jetzt?",
            "response": "12 Grad.",
            "turns": [
                {"role": "user", "content": "Wetter?"},
                {"role": "assistant", "content": "x", "function_call": {}},
            ],
        },
        {"prompt": "Wetter?", "response": "Ich schaue nach.", "tool_calls": [call]},
        {"messages": plain, "tools": tools},
        {"messages": plain, "functions": [{"name": "get_weather"}]},
        {
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hallo"}],
            "tools": '[{"name": "x"}]',
        },
    ]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "tools.jsonl", records))
    said = "; lunatrain trains on text turns only: leave such conversations out, or import with --skip-bad"
    assert info.value.details == [
        f"tools.jsonl line 1: field 'turns[1]': a tool call{said}",
        f"tools.jsonl line 2: field 'turns[1]': a tool call{said}",
        f"tools.jsonl line 3: field 'tool_calls': a tool call{said}",
        f"tools.jsonl line 4: field 'tools': the tools the conversation was given{said}",
        f"tools.jsonl line 5: field 'functions': the tools the conversation was given{said}",
        f"tools.jsonl line 6: field 'tools': the tools the conversation was given{said}",
    ]
    # empty lists and their text, as exports, spreadsheets and chat logs write them when no tool was given
    # (review repro: "" and "[]" as tool_calls or function_call were refused as tool use)
    given_none = [
        {"messages": plain, "tools": [], "functions": None},
        {"messages": plain, "tools": "[]"},
        {"messages": plain, "tools": " ", "function_call": ""},
        {"messages": [plain[0], plain[1] | {"tool_calls": "[]", "function_call": "null"}]},
        {"prompt": "p", "response": "r", "tool_calls": "", "function_call": None},
    ]
    assert len(read_file(_jsonl(tmp_path / "none.jsonl", given_none)).drafts) == 5


def test_a_turns_separate_reasoning_is_refused_not_dropped(tmp_path: Path) -> None:
    """Reasoning explore repro: an assistant message with `reasoning_content` (DeepSeek's and Qwen's API field)
    was imported as "1 added", its reasoning nowhere in the store or the export: the answer trained as if the
    model had answered without thinking. It is refused, saying how to keep it; an empty one is none."""
    user = {"role": "user", "content": "Was ist 3 mal 4?"}
    records = [
        {"messages": [user, {"role": "assistant", "content": "12.", "reasoning_content": "3 mal 4 ist 12."}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y", "thinking": "z"}]},
        {
            "prompt": "Und?",
            "response": "Gut.",
            "turns": [user, {"role": "assistant", "content": "12.", "reasoning": "r"}],
        },
    ]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "think.jsonl", records))
    said = "the turn's reasoning, kept apart from its text; lunatrain trains on a turn's text: write it into the "
    assert [d.split(": ", 2)[1:] for d in info.value.details] == [
        [
            "field 'messages[1].reasoning_content'",
            said + "content as <think>…</think> before the answer (as thinking templates read it), or leave it out",
        ],
        [
            "field 'conversations[1].thinking'",
            said + "content as <think>…</think> before the answer (as thinking templates read it), or leave it out",
        ],
        [
            "field 'turns[1].reasoning'",
            said + "content as <think>…</think> before the answer (as thinking templates read it), or leave it out",
        ],
    ], info.value.details
    empty = {"messages": [user, {"role": "assistant", "content": "12.", "reasoning_content": ""}]}
    assert read_file(_jsonl(tmp_path / "none.jsonl", [empty])).drafts[0].response == "12."
    # review repro: an Alpaca-shaped record's own `reasoning` beside its output was dropped without a word
    alpaca = {"instruction": "Was ist 3 mal 17?", "reasoning": "3 mal 17 = 51", "output": "51"}
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "alpaca.jsonl", [alpaca]))
    assert "field 'reasoning': the record's reasoning, kept apart from its answer;" in info.value.details[0]
    # second review: a flag is no reasoning text ("reasoning": false, "thinking": "off", an effort)
    flags = [
        {"instruction": "a", "reasoning": False, "output": "b"},
        {"instruction": "c", "reasoning": "high", "output": "d"},
        {"messages": [user, {"role": "assistant", "content": "12.", "thinking": "off"}]},
        # a reasoning request's settings (OpenAI's), not its text
        {
            "messages": [
                user,
                {"role": "assistant", "content": "12.", "reasoning": {"effort": "high", "summary": "auto"}},
            ]
        },
    ]
    assert len(read_file(_jsonl(tmp_path / "flags.jsonl", flags)).drafts) == 4
    # Import repro: reasoning as a list or an object (OpenRouter's `reasoning_details`, a list of parts) was
    # dropped without a word, where the same text as a string is refused
    for key, value in (
        ("reasoning_details", [{"type": "reasoning.text", "text": "3 mal 4 ist 12."}]),
        ("reasoning", ["3 mal 4", "ist 12"]),
        ("thinking", {"text": "3 mal 4 ist 12."}),
    ):
        record = {"messages": [user, {"role": "assistant", "content": "12.", key: value}]}
        with pytest.raises(UsageError) as info:
            read_file(_jsonl(tmp_path / "parts.jsonl", [record]))
        assert f"field 'messages[1].{key}': the turn's reasoning, kept apart" in info.value.details[0], (
            info.value.details
        )


@pytest.mark.parametrize(
    ("lines", "bad_line"),
    [
        # header, five rows, then the oversized cell on line 7
        (["prompt,response", *(f"p{i},r{i}" for i in range(5)), "{big},ok"], 7),
        # a quoted cell over three lines before it: lines are file lines, not records
        (["prompt,response", '"eins\nzwei\ndrei",r', *(f"p{i},r{i}" for i in range(3)), "{big},ok"], 8),
        (["{big},response", "p,r"], 1),
    ],
)
def test_csv_cell_over_the_field_limit_names_its_line(tmp_path: Path, lines: list[str], bad_line: int) -> None:
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines).replace("{big}", "x" * 140_000) + "\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        read_file(path)
    assert info.value.details == [f"big.csv line {bad_line}: unreadable CSV (field larger than field limit (131072))"]


def test_a_csv_quote_never_closed_is_an_error_naming_where_it_opened(tmp_path: Path) -> None:
    """Import repro: `ok q,"unterminated` and a row after it imported as one example whose answer held the next
    row ("unterminated\nnext,row"), exit 0: the csv module reads to the end of the file inside an open quote.
    That is refused, naming the line the quoted cell opened on; nothing is imported."""
    path = tmp_path / "u.csv"
    path.write_text('prompt,response\nfirst,fine\nok q,"unterminated\nnext,row\nlast,row\n', encoding="utf-8")
    with pytest.raises(UsageError) as info:
        read_file(path)
    assert info.value.details == [
        "u.csv line 3: a quoted cell opened on this line is never closed (it ran to the end of the file)"
    ], info.value.details
    # a quote closed further down is a cell of several lines, as before
    path.write_text('prompt,response\nok q,"two\nlines"\nnext,row\n', encoding="utf-8")
    assert [(d.prompt, d.response) for d in read_file(path).drafts] == [("ok q", "two\nlines"), ("next", "row")]


@pytest.mark.parametrize("name", ["w.jsonl.gz", "x.parquet", "notes.txt", "noext"])
def test_a_file_of_an_unknown_type_is_refused_before_it_is_read(tmp_path: Path, name: str) -> None:
    """Import repro: a gzipped export (`w.jsonl.gz`) was read whole and decoded first, and refused as "line 1 is
    not valid UTF-8 (byte 0x8b)"; a 300 MB .parquet took 650 MB of memory before its type was looked at. The
    type is the first thing judged."""
    path = tmp_path / name
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    with pytest.raises(UsageError) as info:
        read_file(path)
    said = info.value.message
    assert f"unknown file type {path.suffix or '(none)'!r}" in said and "UTF-8" not in said, said
    if name.endswith(".gz"):
        assert "decompress it first" in said, said


def test_errors_name_the_fields_of_the_users_own_format(tmp_path: Path) -> None:
    """Import repro: an OpenAI record of 210 exchanges was refused with "field 'turns': more than 200 prior
    turns", and an Alpaca instruction and input of 60,000 characters each with "field 'prompt': longer than
    100000 characters": fields the user's file does not have. The error names the record's own field."""
    pairs = [("user", "Frage"), ("assistant", "Antwort")] * 210
    openai = {"messages": [{"role": r, "content": c} for r, c in pairs]}
    sharegpt = {"conversations": [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in pairs]}
    alpaca_long = {"instruction": "x" * 60_000, "input": "y" * 60_000, "output": "ok"}
    alpaca_history = {"instruction": "q", "output": "a", "history": [["Frage", "Antwort"]] * 101}
    expected = {
        "openai": "field 'messages': more than 200 prior turns",
        "sharegpt": "field 'conversations': more than 200 prior turns",
        "alpaca_long": "field 'instruction': longer than 100000 characters (with its input)",
        "alpaca_history": "field 'history': more than 200 prior turns",
    }
    for name, record in (
        ("openai", openai),
        ("sharegpt", sharegpt),
        ("alpaca_long", alpaca_long),
        ("alpaca_history", alpaca_history),
    ):
        with pytest.raises(UsageError) as info:
            read_file(_jsonl(tmp_path / f"{name}.jsonl", [record]))
        assert info.value.details == [f"{name}.jsonl line 1: {expected[name]}"], info.value.details


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_saved_as_jsonl_says_to_name_it_json(tmp_path: Path, indent: int | None) -> None:
    """Import repro: a JSON array in a .jsonl file was refused as "line 1: expected a JSON object, got list"
    (or, pretty-printed, six "malformed JSON" lines), while the same file named .json imports."""
    records = [{"prompt": "Hi", "response": "Hallo"}, {"prompt": "Na?", "response": "Gut."}]
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps(records, indent=indent), encoding="utf-8")
    with pytest.raises(UsageError) as info:
        read_file(path)
    said = info.value.message
    assert "holds one JSON array" in said and "name it array.json" in said and "Nothing was imported" in said, said
    assert [d.prompt for d in read_file(path.rename(tmp_path / "array.json")).drafts] == ["Hi", "Na?"]


def test_csv_blank_lines_before_the_header_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("\n  \nprompt,response\nHi2,Hallo2\n\nHi3,Hallo3\n", encoding="utf-8")
    assert [(d.prompt, d.response) for d in read_file(path).drafts] == [("Hi2", "Hallo2"), ("Hi3", "Hallo3")]
    path.write_text("\nprompt,response\nhello,\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"line 3: field 'response': missing"):
        read_file(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UsageError, match="the file is empty"):
        read_file(path)
    # Import repro: a header alone (or one line, taken for the header) was "the file is empty (no records)"
    for text in ("prompt,response\n", "hello,world\n"):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(UsageError, match=r"its first line is the header .* and no record follows it"):
            read_file(path)


def test_csv_header_names_match_without_case_or_surrounding_spaces(tmp_path: Path) -> None:
    """A spreadsheet's "Prompt, Response" header was refused as an unknown format."""
    path = tmp_path / "sheet.csv"
    path.write_text("Prompt, Response ,TAGS,ConversationId\nHi,Hallo,a;b,c1\n", encoding="utf-8")
    (draft,) = read_file(path).drafts
    assert (draft.prompt, draft.response, draft.tags, draft.conversation_id) == ("Hi", "Hallo", ("a", "b"), "c1")
    path.write_text("Instruction,Output\nSag hallo,Hallo\n", encoding="utf-8")
    assert read_file(path).drafts[0].response == "Hallo"
    path.write_text("prompt,Prompt,response\na,b,c\n", encoding="utf-8")  # one column, twice: refused, as before
    with pytest.raises(UsageError, match="field 'prompt': the header names it twice"):
        read_file(path)


def test_a_json_file_holding_json_lines_is_read_line_by_line(tmp_path: Path) -> None:
    """`datasets.Dataset.to_json("x.json")` writes JSON Lines under a .json name; it was refused as
    "line 2: malformed JSON (Extra data …)"."""
    path = _jsonl(tmp_path / "hf.json", [{"prompt": "a", "response": "b"}, {"instruction": "c", "output": "d"}])
    assert [(d.prompt, d.response) for d in read_file(path).drafts] == [("a", "b"), ("c", "d")]
    # a bad line among them is named by its line, as in a .jsonl file
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"line 2: field 'response': missing"):
        read_file(path)
    # a pretty-printed document with something after it is that error, not a file of bad lines
    path.write_text('[\n  {"prompt": "a", "response": "b"}\n]\n]\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"1 bad record — line 4: malformed JSON \(Extra data"):
        read_file(path)
    # one document that is malformed on its own is still reported as such
    path.write_text('[{"prompt": "a", "response": "b"},]', encoding="utf-8")
    with pytest.raises(UsageError, match=r"line 1: malformed JSON"):
        read_file(path)


def test_csv_separated_by_semicolons_or_tabs_is_read(tmp_path: Path) -> None:
    """Excel in a German locale saves "CSV (Trennzeichen-getrennt)" with ';' between cells; such a file was
    refused as "unknown format". The header decides the separator: the one that names known columns."""
    path = tmp_path / "excel.csv"
    path.write_bytes('\ufeffPrompt;Response;Tags\r\n"Hallo; Luna";Hallo!;a,b\r\nWie geht\'s?;Gut.;\r\n'.encode())
    drafts = read_file(path).drafts
    assert [(d.prompt, d.response, d.tags) for d in drafts] == [
        ("Hallo; Luna", "Hallo!", ("a", "b")),
        ("Wie geht's?", "Gut.", ()),
    ]
    path.write_text("prompt\tresponse\nHi\tHallo\n", encoding="utf-8")
    assert [(d.prompt, d.response) for d in read_file(path).drafts] == [("Hi", "Hallo")]
    # a comma-separated file whose cells hold semicolons keeps the comma
    path.write_text("prompt,response,tags\nHi; du,Hallo,a;b\n", encoding="utf-8")
    (draft,) = read_file(path).drafts
    assert (draft.prompt, draft.tags) == ("Hi; du", ("a", "b"))


def test_a_whole_rating_written_as_a_decimal_is_read(tmp_path: Path) -> None:
    """pandas writes an integer column with a gap as floats ("4.0" in CSV, 4.0 in JSON); such a file was
    refused with "field 'rating': expected a whole number, got number"."""
    path = tmp_path / "pandas.csv"
    path.write_text("prompt,response,rating\np1,r1,4.0\np2,r2,\np3,r3, 5.00 \n", encoding="utf-8")
    assert [d.rating for d in read_file(path).drafts] == [4, None, 5]
    path = _jsonl(tmp_path / "pandas.jsonl", [{"prompt": "p", "response": "r", "rating": 3.0}])
    assert read_file(path).drafts[0].rating == 3
    # a fraction is no rating, and the message shows the value
    _jsonl(path, [{"prompt": "p", "response": "r", "rating": 4.5}])
    with pytest.raises(UsageError, match=r"field 'rating': expected a whole number, got 4\.5"):
        read_file(path)
    _jsonl(path, [{"prompt": "p", "response": "r", "rating": 6.0}])
    with pytest.raises(UsageError, match=r"field 'rating': must be between 1 and 5, got 6"):
        read_file(path)


def test_turns_in_either_key_convention_are_read_in_both_list_shapes(tmp_path: Path) -> None:
    """Unsloth's `standardize_sharegpt` keeps the `conversations` list but writes role/content turns, and some
    exports put from/value turns under `messages`; both were refused ("field 'conversations[0].from': missing")."""
    path = _jsonl(
        tmp_path / "mixed-keys.jsonl",
        [
            {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hallo"}]},
            {"messages": [{"from": "human", "value": "Na?"}, {"from": "gpt", "value": "Gut."}]},
        ],
    )
    parsed = read_file(path)
    assert [(d.prompt, d.response) for d in parsed.drafts] == [("Hi", "Hallo"), ("Na?", "Gut.")]
    assert parsed.formats == {"sharegpt": 1, "openai": 1}
    # errors name the key the turn uses
    _jsonl(path, [{"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}])
    with pytest.raises(UsageError, match=r"field 'conversations\[1\]\.content': missing"):
        read_file(path)
    _jsonl(path, [{"conversations": [{"value": "Hi"}, {"from": "gpt", "value": "x"}]}])
    with pytest.raises(UsageError, match=r"field 'conversations\[0\]\.from': missing"):
        read_file(path)


def test_a_byte_order_mark_at_the_start_of_a_later_line_is_ignored(tmp_path: Path) -> None:
    """`cat a.jsonl b.jsonl` of two files saved with a BOM (Windows editors) carries b's BOM into the middle;
    that line was refused as "malformed JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) …)"."""
    path = tmp_path / "joined.jsonl"
    one = '\ufeff{"prompt": "a", "response": "b"}\n'
    path.write_text(one + one.replace('"a"', '"c"'), encoding="utf-8")
    assert [d.prompt for d in read_file(path).drafts] == ["a", "c"]


def test_an_openai_weight_0_turn_is_kept_as_context_only(tmp_path: Path) -> None:
    """OpenAI's fine-tuning format marks an assistant message `"weight": 0` as not to be trained on. Such a turn
    is kept as context only (`context_only`, part of the content hash); the answer trained is the last one with
    weight 1, and turns after it are dropped as after any last answer. Weights other than 0 and 1, weight 0 on
    a turn that is never trained, and a conversation with no trained answer are refused naming the field."""
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hallo"}
    more, good = {"role": "user", "content": "Und?"}, {"role": "assistant", "content": "Gut"}
    records = [
        {"messages": [user, answer | {"weight": 0}, more, good | {"weight": 1}]},
        {"messages": [user, answer, more, good | {"weight": 0}]},
        {"messages": [user, answer, more, good]},
    ]
    context, trailing, plain = read_file(_jsonl(tmp_path / "ok.jsonl", records)).drafts
    assert (context.prompt, context.response, context.turns) == (
        "Und?",
        "Gut",
        (("user", "Hi"), ("assistant", "Hallo")),
    )
    assert context.context_only == (1,) and plain.context_only == ()
    assert context.hash != plain.hash  # the same words, trained differently: another example
    assert context.stored_turns() == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hallo", "weight": 0},
    ]
    assert (trailing.prompt, trailing.response, trailing.turns) == ("Hi", "Hallo", ())
    # Without weights the hash is the one it always was (stored examples keep theirs).
    assert plain.hash == content_hash(None, (("user", "Hi"), ("assistant", "Hallo")), "Und?", "Gut")

    bad = [
        {"messages": [user, answer | {"weight": 0.5}]},
        {"messages": [user, answer | {"weight": True}]},
        {"messages": [user | {"weight": 0}, answer]},
        {"messages": [user, answer | {"weight": 0}]},
    ]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "weights.jsonl", bad))
    assert info.value.details == [
        "weights.jsonl line 1: field 'messages[1].weight': must be 0 or 1, got 0.5",
        "weights.jsonl line 2: field 'messages[1].weight': must be 0 or 1, got True",
        "weights.jsonl line 3: field 'messages[0].weight': 0 (not trained on) is for assistant turns; no other "
        "turn is trained",
        "weights.jsonl line 4: field 'messages': every assistant turn has weight 0 (nothing to learn)",
    ]
    # The same rules for a caller's own turns (the API's, the store's).
    for turn, why in ((("user", "Hi", 0), "for assistant turns"), (("assistant", "Hallo", 5), "must be 0 or 1")):
        with pytest.raises(RecordError, match=why):
            make_draft(prompt="Und?", response="Gut", turns=[turn])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_with_its_byte_order_mark_is_read(tmp_path: Path, encoding: str) -> None:
    """Repro: a file written by Windows PowerShell 5 (`Get-Content a.jsonl > b.jsonl`: UTF-16 with a byte order
    mark) was refused as "line 1 is not valid UTF-8 (byte 0xff)"; the mark says how to read it."""
    path = tmp_path / "ps.jsonl"
    text = '{"prompt": "Grüß dich", "response": "Hallo 👋"}\r\n{"prompt": "b", "response": "c"}\r\n'
    data = text.encode(encoding)
    path.write_bytes(data if data.startswith((b"\xff\xfe", b"\xfe\xff")) else b"\xfe\xff" + data)
    drafts = read_file(path).drafts
    assert [(d.prompt, d.response) for d in drafts] == [("Grüß dich", "Hallo 👋"), ("b", "c")]
    # cut inside a character: still one sentence, nothing imported
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UsageError, match="starts as UTF-16 text but is not valid UTF-16"):
        read_file(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
@pytest.mark.parametrize("encoding", ["utf-32", "utf-32-be"])
def test_utf32_with_its_byte_order_mark_is_read_as_utf32(tmp_path: Path, encoding: str, suffix: str) -> None:
    """Unicode explore repro: UTF-32's little-endian mark starts with UTF-16's, so a UTF-32 file was decoded as
    UTF-16 and refused as "malformed JSON" or, for a CSV headed `prompt,response`, "unknown format"."""
    path = tmp_path / f"u32{suffix}"
    text = {
        ".json": json.dumps([{"prompt": "Grüße", "response": "Hallo 👋"}], ensure_ascii=False),
        ".jsonl": json.dumps({"prompt": "Grüße", "response": "Hallo 👋"}, ensure_ascii=False) + "\n",
        ".csv": "prompt,response\nGrüße,Hallo 👋\n",
    }[suffix]
    data = text.encode(encoding)
    path.write_bytes(data if encoding == "utf-32" else codecs.BOM_UTF32_BE + data)
    assert [(d.prompt, d.response) for d in read_file(path).drafts] == [("Grüße", "Hallo 👋")]
    path.write_bytes(path.read_bytes()[:-1])  # cut inside a character
    with pytest.raises(UsageError, match="starts as UTF-32 text but is not valid UTF-32"):
        read_file(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_lines_with_classic_mac_line_ends_are_read_line_by_line(tmp_path: Path, suffix: str) -> None:
    """Unicode explore repro: JSON Lines ended by a lone CR were one line, "malformed JSON (Extra data at column
    34)", where a CSV with the same line ends imports. JSON has no raw CR inside a string."""
    path = tmp_path / f"cr{suffix}"
    path.write_bytes(b'{"prompt":"eins","response":"a"}\r{"prompt":"zwei","response":"b"}\r\r{"prompt":"drei"}\r')
    parsed = read_file(path, skip_bad=True)
    assert [(d.prompt, d.response) for d in parsed.drafts] == [("eins", "a"), ("zwei", "b")]
    assert [str(b).split(":")[0] for b in parsed.bad] == [f"cr{suffix} line 4"], parsed.bad
    # review repro: a CR between a document's tokens is JSON whitespace, not a line end
    spaced = tmp_path / f"spaced{suffix}"
    spaced.write_bytes(b'{"prompt": "eins",\r"response": "a"}\n{"prompt":"zwei","response":"b"}\n')
    assert [(d.prompt, d.response) for d in read_file(spaced).drafts] == [("eins", "a"), ("zwei", "b")]
    crlf = tmp_path / f"crlf{suffix}"  # a CRLF line end is one line end
    crlf.write_bytes(b'{"prompt":"eins","response":"a"}\r\n\r\n{"prompt":"drei"}\r\n')
    assert [str(b).split(":")[0] for b in read_file(crlf, skip_bad=True).bad] == [f"crlf{suffix} line 3"]


def test_a_control_character_in_a_json_line_is_said_once(tmp_path: Path) -> None:
    """Repro: "malformed JSON (Invalid control character at at column 13)"."""
    from lunatrain.formats import read_file

    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a\tb", "response": "c"}\n{"prompt": "p", "response": "r"}\n')
    parsed = read_file(path, skip_bad=True)
    said = [str(bad) for bad in parsed.bad]
    assert len(said) == 1 and "malformed JSON (Invalid control character at column 14)" in said[0], said


def test_a_csv_with_lone_cr_endings_and_a_blank_first_line_finds_its_separator(tmp_path: Path) -> None:
    """Review finding: after a blank first line, a lone-CR table's header was not found, so ',' was taken and
    every row was "unknown format"."""
    path = tmp_path / "mac.csv"
    path.write_bytes(b"\rprompt;response\rhi;there\rfoo;bar\r")
    assert [(d.prompt, d.response) for d in read_file(path).drafts] == [("hi", "there"), ("foo", "bar")]


def _random_json_value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth > 2 or r < 0.3:
        return rng.choice([1, -2.5e3, 'ä\n"x\u2028', True, None, 12345678901234567890, "", 0.1, 1e-7])
    if r < 0.6:
        return {f"k{i}": _random_json_value(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return [_random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def test_a_json_array_read_a_record_at_a_time_is_what_json_loads_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A .json array is decoded a record at a time from a window of the file (a whole document held its text
    and every parsed record at once: test_store.py measures it). Whatever the window's size, what it yields is
    what json.loads of the whole text gives: the same records, or its error at the same line and column, on
    valid documents and on ones truncated, cut or spliced at random."""
    import io

    from lunatrain import formats

    rng = random.Random(7)
    checked = 0
    for _ in range(600):
        text = json.dumps(
            [_random_json_value(rng) for _ in range(rng.randint(0, 6))],
            ensure_ascii=rng.random() < 0.5,
            indent=rng.choice([None, 1, 2]),
        )
        if rng.random() < 0.6:
            i = rng.randint(0, len(text))
            text = rng.choice(
                [text[:i], text[:i] + rng.choice([",", "]", "[", "}", "{", '"', "x", "\n", "1"]) + text[i:]]
                + [text[:i] + text[i + 1 :], text + rng.choice(["\n]", " x", "\n{}", "\n\n  ", ","])]
            )
        if not text.lstrip().startswith("["):
            continue
        text = rng.choice(["", "\n  "]) + text
        try:
            want: tuple = ("ok", json.loads(text))
        except json.JSONDecodeError as exc:
            want = ("error", f"line {exc.lineno}", formats._malformed(exc))
        data = rng.choice([b"", codecs.BOM_UTF8]) + text.encode()
        for window in (1, 3, 64, 1 << 20):
            monkeypatch.setattr(formats, "_CHUNK", window)
            got, records = None, []
            for where, rec in formats._json_array(io.BytesIO(data), Path("x.json")):
                if isinstance(rec, formats.RecordError):
                    assert rec.whole
                    got = ("error", where, rec.message)
                    break
                records.append(rec)
            assert (got or ("ok", records)) == want, (text, window, got, want)
        checked += 1
    assert checked > 300


def test_an_openai_records_own_system_prompt_is_kept(tmp_path: Path) -> None:
    """Repro: `{"system": ..., "messages": [...]}` lost its system prompt without a word (ShareGPT, Alpaca and
    prompt-response records keep theirs), and two records that differed only in it imported as one."""
    turns = [{"role": "user", "content": "Wer bist du?"}, {"role": "assistant", "content": "Ich bin Luna."}]
    records = [
        {"system": "Du bist Luna.", "messages": turns},
        {"system": "Du bist ein Pirat.", "messages": turns},
        {"system": "Ignoriert.", "messages": [{"role": "system", "content": "Der eigene."}, *turns]},
    ]
    drafts = read_file(_jsonl(tmp_path / "sys.jsonl", records)).drafts
    assert [d.system for d in drafts] == ["Du bist Luna.", "Du bist ein Pirat.", "Der eigene."]
    assert len({d.hash for d in drafts}) == 3


def test_alpaca_history_becomes_the_earlier_turns(tmp_path: Path) -> None:
    """Repro: LLaMA-Factory's Alpaca `history` (earlier [question, answer] pairs) was dropped without a word,
    so the follow-up question was trained without the exchange it refers to."""
    record = {
        "instruction": "Und die zweite?",
        "input": "",
        "output": "Die zweite ist B.",
        "history": [["Was ist die erste Option?", "Die erste ist A."]],
    }
    (draft,) = read_file(_jsonl(tmp_path / "hist.jsonl", [record])).drafts
    assert draft.turns == (("user", "Was ist die erste Option?"), ("assistant", "Die erste ist A."))
    assert (draft.prompt, draft.response) == ("Und die zweite?", "Die zweite ist B.")
    bad = [record | {"history": h} for h in ("nein", [["nur eine Frage"]], [["q", 3]])]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "bad.jsonl", bad))
    assert info.value.details == [
        "bad.jsonl line 1: field 'history': expected a list of [question, answer] pairs, got string",
        "bad.jsonl line 2: field 'history[0]': expected a [question, answer] pair, got a list of 1",
        "bad.jsonl line 3: field 'history[0][1]': expected a string, got number",
    ]


def test_windows_line_endings_are_one_text_with_unix_ones() -> None:
    """Repro: "Rot\\r\\nBlau" was stored beside "Rot\\nBlau" as another example (they look the same in every
    list), and the model was trained to write carriage returns."""
    lf = make_draft(prompt="Nenne zwei Farben.", response="Rot\nBlau")
    for response in ("Rot\r\nBlau", "Rot\rBlau", "Rot\r\nBlau\r\n"):
        draft = make_draft(prompt="Nenne\r\nzwei Farben.".replace("\r\n", " "), response=response)
        assert draft.response == "Rot\nBlau" and draft.hash == lf.hash


def test_text_parts_are_joined_as_lines(tmp_path: Path) -> None:
    """Repro: two text parts "Lies den Absatz:" and "Der Mond ist hell." became one line with no space
    between them; they are separate blocks, so each starts a line (as OpenAI-compatible servers join them)."""
    parts = [{"type": "text", "text": "Lies den Absatz:"}, {"type": "text", "text": "Der Mond ist hell."}]
    record = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Gelesen."}]}
    (draft,) = read_file(_jsonl(tmp_path / "parts.jsonl", [record])).drafts
    assert draft.prompt == "Lies den Absatz:\nDer Mond ist hell."


def test_the_advice_to_skip_bad_records_is_the_command_lines_only(tmp_path: Path) -> None:
    """Repro: the API's import refused a tool call "… leave such conversations out, or import with
    --skip-bad", an option only the command line has."""
    from lunatrain.formats import parse_record

    call = {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
    record = {"messages": [{"role": "user", "content": "Wetter?"}, {"role": "assistant", "tool_calls": [call]}]}
    with pytest.raises(RecordError) as info:
        parse_record(record)
    assert "--skip-bad" not in info.value.describe() and "leave such conversations out" in info.value.describe()


def test_a_prompt_response_record_keeps_its_earlier_turns(tmp_path: Path, settings: Settings) -> None:
    """Explore repro: `{prompt, response, turns}` (what `examples list --json` writes and `POST /examples` takes)
    imported as a single-turn example under another hash, "1 added" and no word of the turns left out, and a
    user turn with weight 0 (refused by `POST /examples`) went through. The turns are read, and checked."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    turns = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "weight": 0}]
    added = store.add_example(settings, prompt="Q2", response="A2", turns=turns)
    dump = tmp_path / "dump.json"
    dump.write_text(CliRunner().invoke(app, ["examples", "list", "--json"]).output)
    (draft,) = read_file(dump).drafts
    assert draft.turns == (("user", "Q1"), ("assistant", "A1")) and draft.context_only == (1,)
    assert draft.hash == added.hash  # the same example: a duplicate, not a second one
    bad = [
        {"prompt": "a", "response": "b", "turns": [{"role": "user", "content": "Hi", "weight": 0}]},
        {"prompt": "a", "response": "b", "turns": "Q1"},
    ]
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "bad.jsonl", bad))
    assert info.value.details[0].startswith("bad.jsonl line 1: field 'turns[0].weight': "), info.value.details
    assert info.value.details[1] == "bad.jsonl line 2: field 'turns': expected a list of turns, got string"


@pytest.mark.parametrize(
    ("record", "said"),
    [
        (
            {"prompt": "What is 2+2?", "completion": "4"},
            "field 'completion': TRL's prompt/completion records are not read as such; name the answer 'response', "
            "or write the conversation as 'messages'",
        ),
        (
            {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]},
            "field 'completion': TRL's prompt/completion records are not read as such; name the answer 'response', "
            "or write the conversation as 'messages'",
        ),
        (
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            "field 'chosen': a preference pair (chosen/rejected) is no example to train on as it is; keep the "
            "chosen answer as 'response'",
        ),
    ],
)
def test_trl_records_are_named_as_what_they_are(tmp_path: Path, record: dict, said: str) -> None:
    """Explore repro: TRL's prompt/completion was refused with "field 'response': missing", its conversational
    form with "expected a content part (an object with a type)" (its message list taken for text parts), and
    neither said that `completion` was seen and is not read."""
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "trl.jsonl", [record]))
    assert info.value.details == [f"trl.jsonl line 1: {said}"]


def test_a_csv_turns_or_history_cell_is_read_as_the_json_list_it_holds(tmp_path: Path) -> None:
    """Review repro: a `turns` cell (a JSON list, as a spreadsheet keeps it) was read as text, and the whole
    file was refused ("expected a list of turns, got string"); an Alpaca `history` cell the same."""
    path = tmp_path / "turns.csv"
    path.write_text(
        "prompt,response,turns\n"
        'And tomorrow?,Rain.,"[{""role"":""user"",""content"":""Weather today?""},'
        '{""role"":""assistant"",""content"":""Sunny.""}]"\n',
        encoding="utf-8",
    )
    (draft,) = read_file(path).drafts
    assert draft.turns == (("user", "Weather today?"), ("assistant", "Sunny."))
    alpaca = tmp_path / "history.csv"
    alpaca.write_text('instruction,output,history\nUnd B?,B ist zwei.,"[[""Und A?"", ""A ist eins.""]]"\n')
    (draft,) = read_file(alpaca).drafts
    assert draft.turns == (("user", "Und A?"), ("assistant", "A ist eins."))


def test_a_trl_preference_pair_without_a_prompt_is_named_as_one(tmp_path: Path) -> None:
    """Review repro: `{chosen: [...], rejected: [...]}` (TRL's implicit prompt) got "unknown format"."""
    record = {
        "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
    }
    with pytest.raises(UsageError) as info:
        read_file(_jsonl(tmp_path / "pref.jsonl", [record]))
    assert info.value.details[0].startswith("pref.jsonl line 1: field 'chosen': a preference pair"), info.value.details
