"""Reading training records from JSONL / JSON / CSV files in the common chat-data shapes.

Shapes, detected per record (or forced with `fmt`):

- ``openai``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` (input optional, joined below the instruction;
  LLaMA-Factory's optional ``history`` of earlier ``[question, answer]`` pairs gives the prior turns)
- ``prompt-response``: ``{"prompt": ..., "response": ...}``

Every shape takes a record-level ``system`` (a conversation's own leading system turn wins over it).

A turn of either list takes role/content or from/value keys (Unsloth writes role/content turns under
``conversations``).

Every shape may also carry ``tags`` (list or comma-separated string), ``conversation_id`` and ``rating``.
A conversation becomes one example: its last assistant turn is the response, the user turn right before it
the prompt, everything earlier the prior turns; the system prompt is kept. An assistant turn with OpenAI's
``"weight": 0`` is kept as context only (rendered, never trained on; `ExampleDraft.context_only`), and the
response is then the last turn with weight 1. All errors of a file are
collected and raised once, each naming file, line (record number for JSON arrays) and field.

The content hash lives here too because it is a pure function of the normalized text: sha256 over the NFC
normalized, trimmed system prompt (line endings as ``\n``), prior turns, prompt and response (and which turns are context only,
when any is).
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args

from .errors import JSON_FAULTS, UsageError, json_fault, some
from .messages import counted

Format = Literal["auto", "openai", "sharegpt", "alpaca", "prompt-response"]
FORMATS: tuple[str, ...] = ("auto", "openai", "sharegpt", "alpaca", "prompt-response")
RATING_MIN, RATING_MAX = 1, 5
# One example's limits, wherever it comes from (API, CLI, import file): the API's request models use them too.
MAX_TEXT_LEN = 100_000  # characters of a prompt, response, system prompt or turn, after normalization
MAX_TURNS = 200  # prior turns of a multi-turn example
MAX_TAGS = 50
MAX_TAG_LEN = 64
MAX_CONVERSATION_ID_LEN = 200

_ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


def normalize_text(value: str) -> str:
    """Unix line endings, NFC and trim: the same visible text always gives the same hash, whatever editor
    produced it (a Windows one writes CRLF, which would also teach the model to write carriage returns).
    Trimming takes trailing whitespace and leading blank lines; the first line keeps its indent when more
    lines follow, because there it is meaning (a response that opens with a four-space Markdown code block),
    not a stray space before a one-line answer."""
    if _PREVIOUS.get():  # as the previous release read it (`earlier_hash`)
        return _trimmed(value)
    return _trimmed(value.replace("\r\n", "\n").replace("\r", "\n"))


def _trimmed(value: str) -> str:
    """`normalize_text` as it was before line endings were normalized (`earlier_hash`)."""
    text = unicodedata.normalize("NFC", value).rstrip()
    body = text.lstrip()
    if "\n" not in body:
        return body
    return text[text.rfind("\n", 0, len(text) - len(body)) + 1 :]


def _trimmed_whole(value: str) -> str:
    """`normalize_text` as it was before the first line of several kept its indent (`earlier_hash`)."""
    return unicodedata.normalize("NFC", value).strip()


NOT_UNICODE = "is not valid Unicode text (it holds a lone surrogate)"


def is_unicode(value: str) -> bool:
    """False for a str with a lone surrogate, which a JSON escape (`"\\ud800"`) or an undecodable byte in a
    command-line argument (Python's surrogateescape) makes: it has no UTF-8 form to store or tokenize."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def checked_text(value: str, field_name: str | None) -> str:
    """`normalize_text`, refusing what cannot be stored: a lone surrogate, or NUL."""
    if not is_unicode(value):
        raise RecordError(field_name, NOT_UNICODE)
    if "\x00" in value:  # PostgreSQL cannot store it in text; no chat template expects it
        raise RecordError(field_name, "contains a NUL character")
    return normalize_text(value)


def content_hash(
    system: str | None,
    turns: Sequence[tuple[str, str]],
    prompt: str,
    response: str,
    context_only: Sequence[int] = (),
    *,
    trim: Callable[[str], str] = normalize_text,
) -> str:
    # A JSON array keeps field boundaries unambiguous ("a"+"bc" must not equal "ab"+"c").
    payload: list[Any] = [
        trim(system or ""),
        [[role, trim(content)] for role, content in turns],
        trim(prompt),
        trim(response),
    ]
    if context_only:  # only then: every example without such turns keeps the hash it always had
        payload.append(sorted(context_only))
    encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def content_hash_as_stored(system: str | None, turns: Sequence[tuple[str, str]], prompt: str, response: str) -> str:
    """`content_hash` of texts as a row holds them. Rows stored now hold no carriage return; one an earlier
    release stored with them keeps the hash it had then, and so its split (an upgrade moves no sample an
    adapter trained on into val or test)."""
    texts = [system or "", prompt, response, *(content for _, content in turns)]
    trim = _trimmed if any("\r" in text for text in texts) else normalize_text
    return content_hash(system, turns, prompt, response, trim=trim)


# Where an example came from (the examples table's `source`), and where its curation stands (`status`).
Source = Literal["curated", "memory", "conversation"]
SOURCES: tuple[str, ...] = get_args(Source)
Status = Literal["approved", "pending", "rejected"]
STATUSES: tuple[str, ...] = get_args(Status)


@dataclass(frozen=True)
class ExampleDraft:
    """A validated, normalized example that is not yet stored."""

    prompt: str
    response: str
    system: str | None = None
    turns: tuple[tuple[str, str], ...] = ()
    # Indices into `turns` of the assistant turns kept as context only, not trained on (OpenAI's `weight: 0`).
    context_only: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    conversation_id: str | None = None
    rating: int | None = None
    hash: str = field(default="", compare=False)
    # The record's own `source` when it names one of ours (lunatrain's export writes it): a re-imported export
    # keeps its memory samples apart from curated ones. Not part of the content, so not of the hash.
    source: str | None = field(default=None, compare=False)
    # The record's own curation status (an `examples list --json` dump carries it), likewise.
    status: str | None = field(default=None, compare=False)
    # Its hash as the previous release read the same record, where that differs (`earlier_hash`).
    previous: str | None = field(default=None, compare=False)
    # (N, hash) of the example `ex-N` a record of lunatrain's export was written from, where its content no longer
    # has that hash: edited since (store.add_examples says that ex-N stays beside it).
    edited_from: tuple[int, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "hash", content_hash(self.system, self.turns, self.prompt, self.response, self.context_only)
        )

    @functools.cached_property
    def earlier_hash(self) -> str | None:
        """The hash this content had when an earlier release read it, where that differs: a database of that
        release holds the content under it, and a re-import must find it there (or it would come back as new,
        approved even where it had been rejected). The previous release (`previous`) kept line endings as
        written and glued text parts; the one before it trimmed the first line's indent too. Goes when no
        database stored before these rules is in use."""
        if self.previous:
            return self.previous
        texts = [self.system or "", self.prompt, self.response, *(content for _, content in self.turns)]
        if not any(t[:1].isspace() for t in texts):  # nearly every draft: nothing an earlier rule trimmed
            return None
        earlier = content_hash(
            self.system, self.turns, self.prompt, self.response, self.context_only, trim=_trimmed_whole
        )
        return earlier if earlier != self.hash else None

    def with_previous(self, previous: str | None) -> ExampleDraft:
        """This draft knowing its hash as the previous release read it (none where that is this one)."""
        if not previous or previous == self.hash:
            return self
        return dataclasses.replace(self, previous=previous)

    def stored_turns(self) -> list[dict[str, Any]] | None:
        """The prior turns as the examples table keeps them: role and content, and `weight: 0` on a turn
        kept as context only (OpenAI's key, so an export of them reads as their import did)."""
        out = [
            {"role": r, "content": c} | ({"weight": 0} if i in self.context_only else {})
            for i, (r, c) in enumerate(self.turns)
        ]
        return out or None


class RecordError(ValueError):
    """One bad field of one record; `field` is the dotted path inside the record."""

    def __init__(self, field_name: str | None, message: str, *, whole: bool = False) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message
        self.whole = whole  # the document cannot be read past it: it is the file's one problem

    def describe(self) -> str:
        return f"field '{self.field}': {self.message}" if self.field else self.message


# --- validation of single values ----------------------------------------------------------------


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as an error says what it got."""
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def join_parts(texts: Sequence[str]) -> str:
    """The text of a message given as several text parts: separate blocks (an instruction, then a document),
    so each starts a line, as OpenAI-compatible servers join them. Training and chat join them alike."""
    return "".join(texts) if _PREVIOUS.get() else "\n".join(texts)


def _text(value: Any, field_name: str, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise RecordError(field_name, "missing")
        return None
    if isinstance(value, list) and (not value or any(isinstance(p, dict) for p in value)):
        # OpenAI content parts: only text parts carry training content, and their text is a string.
        for i, part in enumerate(value):
            if not isinstance(part, dict) or "type" not in part:
                got = json_type(part) if not isinstance(part, dict) else "an object without a type"
                raise RecordError(f"{field_name}[{i}]", f"expected a content part (an object with a type), got {got}")
            if part["type"] != "text":
                raise RecordError(
                    f"{field_name}[{i}].type", f"{part['type']!r} parts cannot be trained on; only text parts"
                )
        if not all(isinstance(p.get("text"), str) for p in value):
            raise RecordError(field_name, "expected text parts whose 'text' is a string")
        value = join_parts([p["text"] for p in value])
    if not isinstance(value, str):
        raise RecordError(field_name, f"expected a string, got {json_type(value)}")
    text = checked_text(value, field_name)
    if len(text) > MAX_TEXT_LEN:
        raise RecordError(field_name, f"longer than {MAX_TEXT_LEN} characters")
    if not text:
        if required:
            raise RecordError(field_name, "is empty")
        return None
    if invisible(text):  # a zero-width space or a bidi mark alone: no one could read or curate it
        if required:
            raise RecordError(field_name, "shows nothing (only invisible characters, such as zero-width spaces)")
        return None
    return text


def invisible(text: str) -> bool:
    """Whether `text` is only whitespace, format characters (zero-width spaces and joiners, bidi marks, soft
    hyphens) and controls."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc") for ch in text)


def tags_of(value: Any) -> tuple[str, ...]:
    """Tags as a record gives them: a list of strings, or one text of them split at ',' or ';' (a CSV cell)."""
    return _tags(value)


def _tags(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = value.replace(";", ",").split(",")
    if not isinstance(value, list):
        raise RecordError("tags", f"expected a list of strings, got {json_type(value)}")
    if len(value) > MAX_TAGS:
        raise RecordError("tags", f"more than {MAX_TAGS} tags")
    tags: set[str] = set()
    for i, tag in enumerate(value):
        if not isinstance(tag, str):
            raise RecordError(f"tags[{i}]", f"expected a string, got {json_type(tag)}")
        tag = checked_text(tag, f"tags[{i}]")
        if len(tag) > MAX_TAG_LEN:
            raise RecordError(f"tags[{i}]", f"longer than {MAX_TAG_LEN} characters")
        if tag:
            tags.add(tag)
    return tuple(sorted(tags))


def _rating(value: Any) -> int | None:
    if value is None or value == "":
        return None
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses; past 9 digits it is out of range
    # anyway, and int() of thousands of digits is refused too.
    # A whole number written as a decimal ("4.0", 4.0) is one too: pandas writes an integer column with a gap
    # (a missing rating) as floats, in CSV and in JSON.
    if isinstance(value, str) and (whole := re.fullmatch(r"(-?[0-9]{1,9})(?:\.0*)?", value.strip())):
        value = int(whole[1])
    if isinstance(value, float) and abs(value) < 1e9:
        if not value.is_integer():
            raise RecordError("rating", f"expected a whole number, got {value}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError("rating", f"expected a whole number, got {json_type(value)}")
    if not RATING_MIN <= value <= RATING_MAX:
        raise RecordError("rating", f"must be between {RATING_MIN} and {RATING_MAX}, got {value}")
    return value


def _conversation_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RecordError("conversation_id", f"expected a string, got {json_type(value)}")
    value = checked_text(value, "conversation_id")
    if len(value) > MAX_CONVERSATION_ID_LEN:
        raise RecordError("conversation_id", f"longer than {MAX_CONVERSATION_ID_LEN} characters")
    return value or None


def make_draft(
    *,
    prompt: Any,
    response: Any,
    system: Any = None,
    turns: Sequence[Mapping[str, Any]] | Sequence[tuple[str, str]] | Sequence[tuple[str, str, int]] | None = None,
    tags: Any = None,
    conversation_id: Any = None,
    rating: Any = None,
    source: Any = None,
    status: Any = None,
    previous: str | None = None,
) -> ExampleDraft:
    """Validate and normalize one example; raises RecordError naming the bad field. A `source` that is not
    one of lunatrain's (other datasets use the field for their own provenance) is not the example's; a
    `status` that is not one of ours is refused instead, since taking it as approved would train on what
    its author may have meant to hold back. A prior
    turn may carry a weight (a third tuple item, or the mapping's `weight`): 0 keeps an assistant turn as
    context only. `previous`: the record's hash as the previous release read it (`parse_record`); by default
    that of these values, where they hold what it read otherwise (carriage returns, text parts)."""
    if previous is None and not _PREVIOUS.get() and _read_otherwise([prompt, response, system, turns]):
        previous = _as_before(lambda: make_draft(prompt=prompt, response=response, system=system, turns=turns))
    norm_turns: list[tuple[str, str]] = []
    context_only: list[int] = []
    if len(turns or ()) > MAX_TURNS:
        raise RecordError("turns", f"more than {MAX_TURNS} prior turns")
    for i, turn in enumerate(turns or ()):
        if isinstance(turn, tuple) and len(turn) in (2, 3):
            role, content, *rest = turn
            turn = {"role": role, "content": content} | ({"weight": rest[0]} if rest else {})
        elif isinstance(turn, Mapping):
            role, content = turn.get("role"), turn.get("content")
        else:
            raise RecordError(f"turns[{i}]", "expected an object with role and content")
        if isinstance(turn, Mapping) and (tool := _tool_turn(turn, role)):  # as in messages: never trained as text
            raise RecordError(f"turns[{i}]", f"{tool}{_NO_TOOLS}")
        if isinstance(turn, Mapping):
            _refuse_reasoning(turn, f"turns[{i}]")
        if role not in ("user", "assistant"):
            raise RecordError(f"turns[{i}].role", f"must be 'user' or 'assistant', got {role!r}")
        weight = _weight(turn, role, f"turns[{i}].weight")
        norm_turns.append((role, _text(content, f"turns[{i}].content") or ""))
        if weight == 0:
            context_only.append(i)
    return ExampleDraft(
        prompt=_text(prompt, "prompt") or "",
        response=_text(response, "response") or "",
        system=_text(system, "system", required=False),
        turns=tuple(norm_turns),
        context_only=tuple(context_only),
        tags=_tags(tags),
        conversation_id=_conversation_id(conversation_id),
        rating=_rating(rating),
        source=source if isinstance(source, str) and source in SOURCES else None,
        status=_status(status),
    ).with_previous(previous)


# How the previous release read a record's texts (`ExampleDraft.earlier_hash`): line endings as written, text
# parts glued. (It also left an OpenAI record's own `system` and an Alpaca `history` out: those records are
# other content now, and taking the plain twin's hash for theirs would make two different examples one.)
_PREVIOUS: contextvars.ContextVar[bool] = contextvars.ContextVar("previous_release", default=False)


def _as_before(build: Callable[[], ExampleDraft]) -> str | None:
    """The hash of what `build` makes as the previous release read it; None where it refused it."""
    token = _PREVIOUS.set(True)
    try:
        return build().hash
    except RecordError:
        return None
    finally:
        _PREVIOUS.reset(token)


def _read_otherwise(value: Any) -> bool:
    """Whether the previous release may have read `value` (a record, or a draft's raw values) otherwise: it
    holds a carriage return or a list of several text parts."""
    if isinstance(value, str):
        return "\r" in value
    if isinstance(value, Mapping):
        return any(_read_otherwise(v) for v in value.values())
    if isinstance(value, list | tuple):
        parts = [v for v in value if isinstance(v, Mapping) and "type" in v]
        return len(parts) > 1 or any(_read_otherwise(v) for v in value)
    return False


def _status(value: Any) -> str | None:
    if value is None:
        return None
    if value not in STATUSES:
        shown = repr(value) if isinstance(value, str) else json_type(value)
        raise RecordError("status", f"must be approved, pending or rejected, got {shown}")
    return value


# --- record shapes ------------------------------------------------------------------------------


def detect_format(record: Mapping[str, Any]) -> str:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    # One telltale key is enough: a record with "prompt" but no "response" is a prompt-response record
    # with a missing field (a precise error), not a record of unknown shape.
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record or "response" in record:
        return "prompt-response"
    if "output" in record:
        return "alpaca"
    _refuse_trl(record)  # TRL's preference pairs with the prompt in the messages ({chosen: […], rejected: […]})
    raise RecordError(
        None,
        "unknown format: expected 'messages', 'conversations', 'instruction'/'output' or 'prompt'/'response'",
    )


def _from_turns(
    turns: list[tuple[str, str, int]], list_field: str, common: dict[str, Any], system: Any = None
) -> ExampleDraft:
    """Split a conversation into system, prior turns, prompt and response; a leading system turn wins over
    `system` (a record-level system prompt) unless it is empty, which says nothing (without a record-level
    one: no system prompt). The response is the last assistant turn that is trained (weight 1); earlier ones
    with weight 0 stay as context only."""
    # Indices stay those of the record's own list, so every error names the turn the user sees.
    start = 1 if turns and turns[0][0] == "system" else 0
    if start:
        system = turns[0][1] if turns[0][1].strip() else system
    for i in range(start, len(turns)):
        if turns[i][0] == "system":
            raise RecordError(f"{list_field}[{i}]", "a system message is only allowed first")
    last_assistant = max((i for i, (role, _, w) in enumerate(turns) if role == "assistant" and w), default=None)
    if last_assistant is None:
        if any(role == "assistant" for role, _, _ in turns):
            raise RecordError(list_field, "every assistant turn has weight 0 (nothing to learn)")
        raise RecordError(list_field, "no assistant turn (nothing to learn)")
    if last_assistant == start or turns[last_assistant - 1][0] != "user":
        raise RecordError(f"{list_field}[{last_assistant}]", "the last assistant turn must follow a user turn")
    # Turns after the last trained answer have no target; they are dropped rather than trained on.
    prior = turns[start : last_assistant - 1]
    with _named_as(turns=list_field):
        return make_draft(
            prompt=turns[last_assistant - 1][1],
            response=turns[last_assistant][1],
            system=system,
            turns=prior,
            **common,
        )


@contextlib.contextmanager
def _named_as(**fields: str | tuple[str, str]) -> Iterator[None]:
    """A RecordError of `make_draft` about one of its own fields (`turns`, `prompt`) named by the field of the
    record that field was made from (`messages`, `instruction`): the user's file has no other. A (name, note)
    pair adds the note to the message (what else went into it)."""
    try:
        yield
    except RecordError as err:
        if err.field not in fields:
            raise
        name, note = (fields[err.field], None) if isinstance(fields[err.field], str) else fields[err.field]
        raise RecordError(name, err.message + (f" ({note})" if note else "")) from None


# The (role, text) keys of a turn: OpenAI's and ShareGPT's.
_TURN_KEYS = (("role", "content"), ("from", "value"))


def _turn_keys(msg: Mapping[str, Any], role_key: str, text_key: str) -> tuple[str, str]:
    """The keys a turn uses: its list shape's own, or the other shape's when it has that role key instead."""
    if role_key not in msg:
        for other_role, other_text in _TURN_KEYS:
            if other_role in msg:
                return other_role, other_text
    return role_key, text_key


def _turn_list(record: Mapping[str, Any], list_field: str, role_key: str, text_key: str) -> list[tuple[str, str, int]]:
    """The record's turns as (role, content, weight); weight 0 (OpenAI's) marks an assistant turn kept as
    context only."""
    raw = record.get(list_field)
    if raw is None:
        raise RecordError(list_field, "missing")
    if not isinstance(raw, list):
        raise RecordError(list_field, f"expected a list, got {json_type(raw)}")
    if not raw:
        raise RecordError(list_field, "is empty")
    turns: list[tuple[str, str, int]] = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise RecordError(f"{list_field}[{i}]", f"expected an object, got {json_type(msg)}")
        # A turn may use the other shape's keys: Unsloth's standardize_sharegpt writes role/content turns under
        # "conversations", and some exports write from/value turns under "messages".
        r_key, t_key = _turn_keys(msg, role_key, text_key)
        role = msg.get(r_key)
        if tool := _tool_turn(msg, role):
            raise RecordError(f"{list_field}[{i}]", f"{tool}{_NO_TOOLS}")
        _refuse_reasoning(msg, f"{list_field}[{i}]")
        if role is None:
            raise RecordError(f"{list_field}[{i}].{r_key}", "missing")
        if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
            raise RecordError(f"{list_field}[{i}].{r_key}", f"unsupported role {role!r}")
        role = _ROLE_ALIASES[role.lower()]
        # An empty system turn is common in exports and means "no system prompt", as an empty "system" field
        # does in the other shapes; an empty user or assistant turn has nothing to train on.
        content = _text(msg.get(t_key), f"{list_field}[{i}].{t_key}", required=role != "system")
        turns.append((role, content or "", _weight(msg, role, f"{list_field}[{i}].weight")))
    return turns


# Tool use: OpenAI's `tool_calls`/`function_call` on an assistant message and its `tool`/`function` results,
# Llama 3's `ipython`, LLaMA-Factory's ShareGPT `function_call`/`observation` turns. The chat template would
# need the tools and the calls' own format to train them; flattened to text they would teach a wrong shape, and
# dropping the call would train the answer without what it was based on.
_TOOL_CALL_ROLES = {"function_call"}
_TOOL_RESULT_ROLES = {"tool", "function", "ipython", "observation"}
_NO_TOOLS = "; lunatrain trains on text turns only: leave such conversations out"
_SKIP_BAD = ", or import with --skip-bad"  # the command line's way to leave them out (`read_file`)


def _given(value: Any) -> bool:
    """Whether a tool field holds anything: exports write `tool_calls: []`, `function_call: null` and their JSON
    text (`""`, `"[]"`, `"null"`, as spreadsheets and LLaMA-Factory's string fields hold them) on plain turns."""
    if isinstance(value, str):
        return value.strip() not in ("", "[]", "null")
    return value is not None and value != []


def _tool_turn(msg: Mapping[str, Any], role: Any) -> str | None:
    """ "a tool call" / "a tool result" when the turn is part of tool use, else None."""
    name = role.lower() if isinstance(role, str) else None
    if _given(msg.get("tool_calls")) or _given(msg.get("function_call")) or name in _TOOL_CALL_ROLES:
        return "a tool call"
    return "a tool result" if name in _TOOL_RESULT_ROLES else None


# Where reasoning models' APIs and exports keep a turn's reasoning apart from its text (DeepSeek's and Qwen's
# `reasoning_content`, others' `reasoning`/`thinking`, OpenRouter's `reasoning_details`: a list of parts).
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking", "reasoning_details")
_REASONING_FLAGS = {
    *("", "[]", "null", "none", "on", "off", "true", "false", "yes", "no", "low", "medium", "high"),
    *("minimal", "auto", "concise", "detailed"),  # OpenAI's reasoning settings: {"effort": …, "summary": …}
}


def _holds_reasoning(value: Any) -> bool:
    """Whether `value` holds reasoning text: a string that is no flag, or a list or object with one in it (the
    parts of a `reasoning_details` list); a number, a boolean or settings ({"effort": "high"}) hold none."""
    if isinstance(value, str):
        return value.strip().lower() not in _REASONING_FLAGS
    if isinstance(value, list):
        return any(_holds_reasoning(v) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_reasoning(v) for k, v in value.items() if k != "type")  # a part's type is no text
    return False


def _refuse_reasoning(msg: Mapping[str, Any], where: str | None) -> None:
    """A turn's (or, `where` None, a record's) separate reasoning is refused, not dropped: imported without it,
    the answer would train as if the model had answered without thinking, and nothing would say so."""
    for key in _REASONING_KEYS:
        # reasoning is text; a flag (`"reasoning": false`, `"thinking": "off"`, an effort such as "high") is none
        if _holds_reasoning(msg.get(key)):
            whose = (
                "turn's reasoning, kept apart from its text"
                if where
                else "record's reasoning, kept apart from its answer"
            )
            raise RecordError(
                f"{where}.{key}" if where else key,
                f"the {whose}; lunatrain trains on a turn's text: write it into the content as <think>…</think> "
                "before the answer (as thinking templates read it), or leave it out",
            )


def _weight(msg: Mapping[str, Any], role: Any, field_name: str) -> int:
    """OpenAI's per-message `weight`: 1 (trained, the default) or 0 (an assistant turn kept as context only,
    not trained on). Only assistant turns are trained, so only they may say 0."""
    weight = msg.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordError(field_name, f"must be 0 or 1, got {weight!r}")
    if weight == 0 and role != "assistant":
        raise RecordError(field_name, "0 (not trained on) is for assistant turns; no other turn is trained")
    return int(weight)


def parse_record(record: Any, fmt: str = "auto", *, own_status: bool = True) -> tuple[ExampleDraft, str]:
    """One decoded record → (draft, detected format). Raises RecordError. `own_status` False: the caller
    sets every record's status, so the record's own `status` (perhaps another dataset's field) is not read."""
    if not isinstance(record, dict):
        raise RecordError(None, f"expected a JSON object, got {json_type(record)}")
    shape = detect_format(record) if fmt == "auto" else fmt
    common = {
        "tags": record.get("tags"),
        "conversation_id": record.get("conversation_id", record.get("conversationId")),
        "rating": record.get("rating"),
        "source": record.get("source"),
        "status": record.get("status") if own_status else None,
        "previous": "",  # decided below for the record as a whole, not by make_draft for its parts
    }
    _refuse_tools(record)
    before = _PREVIOUS.get()
    if shape == "openai":
        turns = _turn_list(record, "messages", "role", "content")
        draft = _from_turns(turns, "messages", common, system=record.get("system"))
    elif shape == "sharegpt":
        turns = _turn_list(record, "conversations", "from", "value")
        draft = _from_turns(turns, "conversations", common, system=record.get("system"))
    elif shape == "alpaca":
        instruction = _text(record.get("instruction"), "instruction")
        extra = _text(record.get("input"), "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        turns = _alpaca_history(record.get("history"))
        output = _field(record, "output")
        # the prompt is the instruction and its input, one text: too long together is said of the instruction
        with _named_as(turns="history", prompt=("instruction", "with its input") if extra else "instruction"):
            draft = make_draft(prompt=prompt, response=output, system=record.get("system"), turns=turns, **common)
    elif shape == "prompt-response":
        _refuse_trl(record)
        turns = record.get("turns")  # earlier turns, as `examples list --json` writes them and POST /examples takes
        if turns is not None and not isinstance(turns, list):
            raise RecordError("turns", f"expected a list of turns, got {json_type(turns)}")
        draft = make_draft(
            prompt=_field(record, "prompt"),
            response=_field(record, "response"),
            system=record.get("system"),
            turns=turns,
            **common,
        )
    else:
        raise UsageError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if not before and _read_otherwise(record):
        previous = _as_before(lambda: parse_record(record, shape, own_status=own_status)[0])
        draft = draft.with_previous(previous)
    # The record's own id as lunatrain's export writes it (a memory item's `mem-N` imports as an example: no edit).
    own_id, own_hash = record.get("id"), record.get("hash")
    number = record_number(own_id, "ex", bare=False) if isinstance(own_id, str) else None
    if number and isinstance(own_hash, str) and own_hash != draft.hash:
        draft = dataclasses.replace(draft, edited_from=(number, own_hash))
    return draft, shape


# The ids lunatrain writes for its records (export records, prepare's report, the command line): `ex-12` for an
# example, `mem-3` for a memory item; each kind's commands and routes take its own, and the bare number.
ID_KINDS = {"ex": ("an example", "examples"), "mem": ("a memory item", "memory")}


def record_number(value: str, prefix: str, *, bare: bool = True) -> int | None:
    """N of `prefix-N` (and of a bare `N` with `bare`): ASCII digits, no more than an id can have (19), not
    what int() would take besides (`+1`, ` 1`, `1.0`, `²`); None for anything else. The range is the caller's."""
    m = re.fullmatch(rf"(?:{prefix}-){'?' if bare else ''}([0-9]{{1,19}})", value)
    return int(m[1]) if m else None


def other_kind(value: str, prefix: str) -> str | None:
    """The other kind's prefix when `value` is written as its id (`mem-3` where an example's is asked): its
    number alone would name a record of this kind."""
    other = next(p for p in ID_KINDS if p != prefix)
    return other if record_number(value, other, bare=False) is not None else None


def _refuse_tools(record: Mapping[str, Any]) -> None:
    """Tool use named beside the turns, refused as a tool turn is: a record's own `tool_calls` or `function_call`
    (its answer called a tool), or the `tools`/`functions` it was given (OpenAI's lists, LLaMA-Factory's string):
    without them its answers speak of tools the served model is never given (chat refuses them)."""
    if _tool_turn(record, None):
        field = "tool_calls" if _given(record.get("tool_calls")) else "function_call"
        raise RecordError(field, f"a tool call{_NO_TOOLS}")
    for key in ("tools", "functions"):
        if _given(record.get(key)):
            raise RecordError(key, f"the tools the conversation was given{_NO_TOOLS}")
    _refuse_reasoning(record, None)  # an Alpaca-shaped record's own `reasoning` beside its `output`


def _refuse_trl(record: Mapping[str, Any]) -> None:
    """TRL's shapes, named as what they are: without this, `completion` went unseen ("field 'response':
    missing") and a conversational prompt's message list was taken for text parts."""
    if "response" in record:
        return
    if "completion" in record:
        raise RecordError(
            "completion",
            "TRL's prompt/completion records are not read as such; name the answer 'response', or write the "
            "conversation as 'messages'",
        )
    if "chosen" in record:
        raise RecordError(
            "chosen",
            "a preference pair (chosen/rejected) is no example to train on as it is; keep the chosen answer as "
            "'response'",
        )


def _alpaca_history(value: Any) -> list[tuple[str, str]]:
    """LLaMA-Factory's Alpaca `history`: the earlier exchanges, oldest first, as [question, answer] pairs."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError("history", f"expected a list of [question, answer] pairs, got {json_type(value)}")
    turns = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"a list of {len(pair)}" if isinstance(pair, list) else json_type(pair)
            raise RecordError(f"history[{i}]", f"expected a [question, answer] pair, got {got}")
        for role, (j, text) in zip(("user", "assistant"), enumerate(pair), strict=True):
            turns.append((role, _text(text, f"history[{i}][{j}]") or ""))
    return turns


def _field(record: Mapping[str, Any], name: str) -> str | None:
    # Validated under the record's own field name, so errors say "output", not "response".
    return _text(record.get(name), name)


# --- files --------------------------------------------------------------------------------------


@dataclass
class ParsedFile:
    path: Path
    drafts: list[ExampleDraft]
    formats: dict[str, int]
    bad: list[str] = field(default_factory=list)  # with skip_bad: "FILE line N: problem" of each record left out


def _marked_encoding(head: bytes) -> str | None:
    """The encoding a byte order mark at the file's start names, other than UTF-8's: UTF-16 is what Windows
    PowerShell 5 writes with `>` and Excel's "Unicode text"; UTF-32 is asked first, since its little-endian mark
    starts with UTF-16's."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32"
    return "UTF-16" if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else None


def _decode(data: bytes, path: Path) -> str:
    # The mark says the encoding, so it is read as that; without a mark, UTF-8 is the only one assumed.
    if encoding := _marked_encoding(data[:4]):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            raise UsageError(
                f"Cannot import {path.name}: it starts as {encoding} text but is not valid {encoding}; save the "
                "file as UTF-8. Nothing was imported."
            ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(
            f"Cannot import {path.name}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
            "save the file as UTF-8. Nothing was imported."
        ) from None


def _records(path: Path, fh: BinaryIO) -> Iterator[tuple[str, Any]]:
    """Yield (location, decoded record or RecordError) for each record of the open file `fh`. JSON Lines and
    CSV in UTF-8 are read a line at a time, JSON Lines under a .json name too, a JSON array in UTF-8 a record
    at a time (a file of months of logs is never held whole); any other JSON document (one object), or a file in
    UTF-16, is read whole."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv"):  # before a byte is read: a .parquet of 300 MB
        packed = " (a compressed file: decompress it first)" if suffix in (".gz", ".zip", ".bz2", ".xz", ".zst") else ""
        raise UsageError(
            f"Cannot import {path.name}: unknown file type {suffix or '(none)'!r}{packed}; use .jsonl, .json or .csv."
        )
    marked = _marked_encoding(fh.read(4)) is not None  # UTF-16 or UTF-32: read whole
    fh.seek(0)
    if suffix in (".jsonl", ".ndjson") and _starts_an_array(fh, of_objects=True):  # each line refused, none says why
        raise UsageError(
            f"Cannot import {path.name}: it holds one JSON array, not JSON Lines (one object a line); name it "
            f"{path.stem}.json to import the array. Nothing was imported."
        )
    if suffix in (".jsonl", ".ndjson") and not marked:
        yield from _json_lines(_utf8_lines(fh, path))
        return
    if suffix == ".json" and not marked and _starts_an_array(fh):
        yield from _json_array(fh, path)
        return
    if suffix == ".json" and not marked and _lines_of_documents(fh):
        yield from _json_lines(_utf8_lines(fh, path))  # what the whole read below finds, a line at a time
        return
    if suffix == ".csv":
        yield from _csv_records(_csv_lines(fh, path, marked))
        return
    text = _decode(fh.read(), path)
    if suffix in (".jsonl", ".ndjson"):
        yield from _json_lines(text.split("\n"))
    elif suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and "\n" not in text[: exc.pos].strip():
                # A one-line document and more after it: JSON Lines under a .json name, as
                # `datasets.Dataset.to_json` writes by default. Read it as such, so each line is checked and named
                # on its own. (After a document of several lines, the extra data is the error to name.)
                yield from _json_lines(text.split("\n"))
                return
            yield f"line {exc.lineno}", RecordError(None, _malformed(exc))
            return
        except JSON_FAULTS as exc:
            yield f"line {getattr(exc, 'lineno', 1)}", RecordError(None, _malformed(exc))
            return
        if isinstance(doc, dict):
            doc = [doc]
        if not isinstance(doc, list):
            yield "line 1", RecordError(None, f"expected a JSON array of records, got {json_type(doc)}")
            return
        for i, rec in enumerate(doc, start=1):
            yield f"record {i}", rec


def _has_text(path: Path) -> bool:
    """Whether the file holds anything but whitespace (in its first 4 KiB; a file that could not be read holds
    none here: reading it said so before)."""
    try:
        with open(path, "rb") as fh:
            return bool(fh.read(4096).removeprefix(codecs.BOM_UTF8).strip())
    except OSError:
        return False


def _starts_an_array(fh: BinaryIO, *, of_objects: bool = False) -> bool:
    """Whether the first character after the byte order mark and any whitespace is `[` (then rewound);
    `of_objects`: and the first thing in it is an object (`[{`), an array of records."""
    start = fh.read(4096)
    fh.seek(0)
    start = start.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n")
    if not of_objects:
        return start.startswith(b"[")
    return start.startswith(b"[") and start[1:].lstrip(b" \t\r\n").startswith(b"{")


def _lines_of_documents(fh: BinaryIO) -> bool:
    """Whether the file's first non-blank line is a JSON document of its own and another non-blank line follows
    (then rewound): JSON Lines under a .json name, as `datasets.Dataset.to_json` writes it by default. It is the
    file the whole read of `_records` takes for JSON Lines ("Extra data" after a first document of one line);
    recognised here from its first lines, it is read a line at a time instead of whole."""
    try:
        lines = (raw for raw in fh if raw.strip())
        first = next(lines, None)
        if first is None:
            return False
        try:
            json.loads(first.decode("utf-8-sig"))
        except JSON_FAULTS:  # UnicodeDecodeError is a ValueError
            return False  # a document of several lines, or a bad first line: the whole read names what is wrong
        return next(lines, None) is not None
    finally:
        fh.seek(0)


_CHUNK = 1 << 20


def _json_array(fh: BinaryIO, path: Path) -> Iterator[tuple[str, Any]]:
    """The records of a JSON array, decoded one at a time from a window of the file: what `json.loads` of the
    whole text yields as `record N`, and its error (line, message, column) where the text is not JSON. That
    error ends the document (`whole`): nothing after it can be read as records."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    scan = json.JSONDecoder()
    buf, pos, first_line, eof = "", 0, 1, False  # buf starts a line: first_line is its number in the file

    def more() -> bool:
        """Read on (as much again as the window holds, for a record longer than a chunk); drop the window's
        whole lines before `pos`, so that a column can still be counted from its line's start."""
        nonlocal buf, pos, first_line, eof
        if eof:
            return False
        data = fh.read(max(_CHUNK, len(buf)))
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError:
            fh.seek(0)
            _decode(fh.read(), path)  # raises, naming the line
            raise UsageError(f"Cannot import {path.name}: it is not valid UTF-8. Nothing was imported.") from None
        eof = not data
        cut = buf.rfind("\n", 0, pos) + 1
        first_line += buf.count("\n", 0, cut)
        buf, pos = buf[cut:] + text, pos - cut
        return True

    def skip_space() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return

    def fault(message: str, at: int) -> tuple[str, RecordError]:
        column = at - buf.rfind("\n", 0, at)
        what = f"malformed JSON ({message.removesuffix(' at')} at column {column})"
        return f"line {first_line + buf.count(chr(10), 0, at)}", RecordError(None, what, whole=True)

    skip_space()
    pos += 1  # the "[" (_starts_an_array)
    skip_space()
    closed = pos < len(buf) and buf[pos] == "]"
    n = 0
    while not closed:
        skip_space()
        while True:
            try:
                record, end = scan.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if more():  # the record may go on past the window
                    continue
                yield fault(exc.msg, exc.pos)
                return
            except JSON_FAULTS as exc:  # nested too deeply, a number of too many digits
                yield f"line {first_line + buf.count(chr(10), 0, pos)}", RecordError(None, _malformed(exc), whole=True)
                return
            # A number the window cut ("0." of "0.5", "12" of "125") decodes as a shorter one: one not yet
            # followed by what may follow a record is read again with more of the file.
            cut = not isinstance(record, dict | list | str) and (end == len(buf) or buf[end] not in " \t\r\n,]")
            if cut and more():
                continue
            break
        n += 1
        yield f"record {n}", record
        pos = end
        skip_space()
        if pos < len(buf) and buf[pos] == ",":
            pos += 1
        elif pos < len(buf) and buf[pos] == "]":
            closed = True
        else:
            yield fault("Expecting ',' delimiter", pos)
            return
    pos += 1  # the "]"
    skip_space()
    if pos < len(buf):
        yield fault("Extra data", pos)


def _utf8_lines(fh: BinaryIO, path: Path) -> Iterator[str]:
    """The file's lines as text, split on "\\n" only (str.splitlines() would also break at U+2028 etc., which
    JSON allows in strings); invalid UTF-8 refuses the whole file, naming the line, as `_decode` does."""
    for lineno, raw in enumerate(fh, start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"Cannot import {path.name}: line {lineno} is not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                "save the file as UTF-8. Nothing was imported."
            ) from None
        yield line.removesuffix("\n")


def _csv_lines(fh: BinaryIO, path: Path, marked: bool) -> Iterator[str]:
    """The file's lines with their endings, split at \\n, \\r\\n or a lone \\r (what csv.reader expects from
    a file opened with newline=""); invalid UTF-8 refuses the whole file, naming the line, as `_decode` does.
    `marked`: a file in UTF-16 or UTF-32 (`_marked_encoding`), decoded whole."""
    if marked:
        yield from io.StringIO(_decode(fh.read(), path), newline="")
        return
    stream = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
    try:
        yield from stream
    except UnicodeDecodeError:
        stream.detach()
        fh.seek(0)
        _decode(fh.read(), path)  # raises, naming the line
        raise UsageError(f"Cannot import {path.name}: it is not valid UTF-8. Nothing was imported.") from None


def _csv_records(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    # The lines up to the first one that is not blank: that header (the last of them) says the delimiter.
    first: list[str] = []
    for line in lines:
        first.append(line)
        if line.strip():
            break
    # csv.reader, not DictReader: DictReader's line_num lags one row behind after a csv.Error, and it takes a
    # blank first line for an empty header.
    # strict: a quote opened and never closed is an error at the end of the file, not a cell that swallows every
    # row after it (and a quote followed by more than a separator, which no spreadsheet writes, is one too).
    rows = csv.reader(itertools.chain(first, lines), delimiter=_csv_delimiter(first[-1] if first else ""), strict=True)
    start = 1  # the line the record being read began on
    try:
        # A blank or whitespace-only line is no header: skip it, as blank lines between rows are skipped.
        header = next((row for row in rows if not _blank_csv_line(row)), None)
        if header is None:
            return
        header = [_CSV_COLUMNS.get(name.strip().casefold(), name.strip()) for name in header]
        twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
        if twice is not None:  # one of the repeated column's cells would be dropped without a word
            yield f"line {rows.line_num}", RecordError(twice, "the header names it twice")
            return
        while True:
            start = rows.line_num + 1
            row = next(rows, None)
            if row is None:
                break
            if row:
                # Line of the row's end: with the header on line 1, the first data row reports line 2.
                yield f"line {rows.line_num}", _csv_row(header, row)
    except csv.Error as exc:  # e.g. a cell over the csv module's field size limit: the reader cannot go on
        if str(exc) == "unexpected end of data":  # the file ended inside a quoted cell: where it opened
            yield (
                f"line {start}",
                RecordError(None, "a quoted cell opened on this line is never closed (it ran to the end of the file)"),
            )
            return
        # The reader has counted the line it stopped in, which is inside the bad record.
        yield f"line {rows.line_num}", RecordError(None, f"unreadable CSV ({exc})")


def _json_lines(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """Each line's document. A lone \\r ends a line too (classic Mac line ends, which a CSV is read with) where
    the line is no document as a whole: JSON has no raw \\r inside a string, but allows one between tokens
    (`{"a": 1,\\r"b": 2}` is one document); \\r\\n is one line end."""
    lineno = 0
    for physical in lines:
        line = physical.removesuffix("\r")
        parts = line.split("\r") if "\r" in line and not _one_document(line) else [line]
        for part in parts:
            lineno += 1
            yield from _json_line(lineno, part)


def _one_document(line: str) -> bool:
    try:
        json.loads(line.removeprefix("\ufeff"))
    except JSON_FAULTS:
        return False
    return True


def _json_line(lineno: int, line: str) -> Iterator[tuple[str, Any]]:
    if line.strip():
        try:
            # A BOM inside the text is one a concatenation (`cat a.jsonl b.jsonl`) carried in from a file's start:
            # a marker, not content, as the one at the file's start is.
            yield f"line {lineno}", json.loads(line.removeprefix("\ufeff"))
        except JSON_FAULTS as exc:
            yield f"line {lineno}", RecordError(None, _malformed(exc))


def _malformed(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        # some of json's messages end in "at" already ("Invalid control character at")
        return f"malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
    return f"malformed JSON ({json_fault(exc)})"


# The fields a record's shapes read, by their case-folded names: a spreadsheet's header ("Prompt, Response")
# names them in its own case and spacing.
_CSV_COLUMNS = {
    name.casefold(): name
    for name in (
        "messages",
        "conversations",
        "instruction",
        "input",
        "output",
        "prompt",
        "response",
        "system",
        "tags",
        "rating",
        "conversation_id",
        "conversationId",
        "turns",
        "history",
        "status",
        # a memory item's (`memory import`), so that a semicolon file of them is read by its header too
        "question",
        "answer",
        "topic",
    )
}


# Cell separators a spreadsheet saves "CSV" with: ',' and, in locales whose decimal mark is the comma (German
# Excel's "CSV (Trennzeichen-getrennt)"), ';'; tab for a tab-separated export.
_CSV_DELIMITERS = (",", ";", "\t")


def _csv_delimiter(header: str) -> str:
    """The separator under which the header (the first non-blank line) names the most known columns; ',' on a
    tie. The header decides, not the cells: a comma file's cells may hold ';' (tags "a;b"), and vice versa."""

    def known(delimiter: str) -> int:
        try:
            row = next(csv.reader([header], delimiter=delimiter), [])
        except csv.Error:  # e.g. a cell over the field size limit: reading the file names its line
            return 0
        return sum(name.strip().casefold() in _CSV_COLUMNS for name in row)

    return max(_CSV_DELIMITERS, key=known)  # max keeps the first of equals: ','


def _blank_csv_line(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _csv_row(header: list[str], row: list[str]) -> Any:
    if len(row) > len(header):
        return RecordError(None, "more cells than header columns")
    rec: dict[str, Any] = {}
    # A short row's missing cells count as empty cells.
    for key, value in zip(header, row + [""] * (len(header) - len(row)), strict=True):
        if value == "":
            # Keep the column: the header decides the shape, and an empty cell reads as "missing".
            rec[key] = None
            continue
        # Lists are written as JSON in a cell (as `examples list --json` writes them); tags may also be "a;b".
        if key in ("messages", "conversations") or (
            key in ("tags", "turns", "history") and value.lstrip().startswith("[")
        ):
            try:
                value = json.loads(value)
            except JSON_FAULTS as exc:
                return RecordError(key, f"malformed JSON in cell ({json_fault(exc)})")
        rec[key] = value
    return rec


@contextlib.contextmanager
def _read_faults(path: Path) -> Iterator[None]:
    """A read that fails part way (EIO, a file on a share that went away) refuses the file in one sentence."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"Cannot import {path}: {exc.strerror or exc}. Nothing was imported.") from None


def _open_import(path: Path) -> BinaryIO:
    """The file to import, open; UsageError for what cannot be one."""
    try:
        if path.is_dir():
            raise IsADirectoryError
        # A pipe or a device would be read until a writer comes or forever (/dev/zero): regular files only.
        if path.exists() and not path.is_file():
            raise UsageError(f"Cannot import {path}: it is not a regular file.")
        return path.open("rb")
    except FileNotFoundError:
        raise UsageError(f"Cannot import {path}: file not found.") from None
    except IsADirectoryError:
        raise UsageError(f"Cannot import {path}: it is a directory, not a file.") from None
    except OSError as exc:  # not a directory on the way, a name too long, no permission
        raise UsageError(f"Cannot import {path}: {exc.strerror or exc}.") from None


def read_memory_file(path: Path) -> list[tuple[str, Any]]:
    """(location, record) of each record of a file of memory items (`memory list --json` writes an array of
    them; JSON Lines and CSV as for examples); a record that is no JSON is a RecordError in its place."""
    with _open_import(path) as fh, _read_faults(path):
        return list(_records(path, fh))


def read_file(path: Path, fmt: str = "auto", *, skip_bad: bool = False, own_status: bool = True) -> ParsedFile:
    """Parse a whole file; any bad record → one UsageError listing all problems (details = the full list).
    `skip_bad`: the good records are returned and the bad ones listed in `bad` instead (a file without any
    good record is still refused)."""
    if fmt not in FORMATS:
        raise UsageError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}.")
    fh = _open_import(path)
    drafts: list[ExampleDraft] = []
    formats: dict[str, int] = {}
    problems: list[str] = []
    with fh, _read_faults(path):
        for where, rec in _records(path, fh):
            if isinstance(rec, RecordError) and rec.whole:  # the file's one problem, whatever came before it
                drafts, formats, problems = [], {}, [f"{where}: {rec.describe()}"]
                break
            try:
                if isinstance(rec, RecordError):
                    raise rec
                draft, shape = parse_record(rec, fmt, own_status=own_status)
            except RecordError as err:
                problems.append(f"{where}: {err.describe()}")
                continue
            drafts.append(draft)
            formats[shape] = formats.get(shape, 0) + 1
    if problems and not (skip_bad and drafts):
        which = counted(len(problems), "bad record")
        if skip_bad:  # said as given: the advice to use --skip-bad would read as if it had not been
            which = f"none of its {counted(len(problems), 'record')} can be imported"
        else:
            problems = [p + _SKIP_BAD if p.endswith(_NO_TOOLS) else p for p in problems]
        raise UsageError(
            f"Cannot import {path.name}: {which} — {some(problems)}. Nothing was imported.",
            details=[f"{path.name} {p}" for p in problems],
        )
    if not drafts:
        if path.suffix.lower() == ".csv" and _has_text(path):  # a header line is no record: say which line it took
            raise UsageError(
                f"Cannot import {path.name}: its first line is the header (the column names: prompt, response, …) "
                "and no record follows it. Nothing was imported."
            )
        raise UsageError(f"Cannot import {path.name}: the file is empty (no records). Nothing was imported.")
    return ParsedFile(path=path, drafts=drafts, formats=formats, bad=[f"{path.name} {p}" for p in problems])
