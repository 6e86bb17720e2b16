"""Chat templates: which one a run uses, the turn terminator it emits, and the tokens it needs.

The **turn terminator** is what the template writes right after an assistant message's content: the token
the model must learn to produce to end its turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`,
`</s>` …). It is often not `tokenizer.eos_token` (Gemma's eos is `<eos>`, Phi-3's `<|endoftext|>`, a Qwen
base model's `<|endoftext|>`), so it is read from the template itself: a small probe conversation is
rendered and the tokens that follow the first assistant answer, both at the end of the text and before the
next user turn, are the terminator (the newline a template adds after it is never generated, so it is not
part of it). `turn_terminator` is the one place that answers this, for training, preflight, merge, the eval
gate's generation and any inference server.

**Which template**: the base model's own, unless `chatTemplate` names another: a template bundled under
`resources/templates/NAME.jinja`, or one stored from a `.jinja` file by the CLI under
`<home>/data/templates/NAME.jinja` (`store_template`). Requests name a template, never a file path.

**Missing tokens**: a template's markers (`<|im_start|>` …) must be single tokens. When the vocabulary
lacks them they are added to the tokenizer; the new ids must fall inside the model's embedding matrix
(real models have spare rows beyond the tokenizer), and training then learns those rows as PEFT trainable
tokens, saved with the adapter, so the adapter loads on the unmodified base.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UsageError, pattern
from .messages import counted

# Bundled and stored template names: no path separators, so a name can never reach outside its folder.
NAME_PATTERN = pattern(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$",
    "should be a template name: 1-80 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
NAME_RE = re.compile(NAME_PATTERN)
# Marker-like strings in a template's source that must be single tokens: <|im_start|>, <start_of_turn> …, and
# DeepSeek's full-width ones (<｜User｜>, <｜end▁of▁sentence｜>): as text, its terminator was 18 tokens that no
# generation stops on.
_MARKER = re.compile(r"<\|[A-Za-z0-9_.-]{1,40}\|>|<(?:start|end)_of_turn>|<\uff5c[A-Za-z0-9_.\u2581-]{1,40}\uff5c>")

_PROBE_USER = ("Probe question one?", "Probe question two?")
_PROBE_ANSWER = ("Probe answer one.", "Probe answer two.")


@dataclass(frozen=True)
class Terminator:
    """The turn terminator of a chat template, and the ids that should stop generation."""

    text: str  # e.g. "<end_of_turn>"
    ids: tuple[int, ...]  # its tokens (one for every real template)
    generation_eos: tuple[int, ...]  # eos_token_id of the base model's generation_config.json (empty: none)
    tokenizer_eos: int | None

    @property
    def in_generation_config(self) -> bool:
        return len(self.ids) == 1 and self.ids[0] in self.generation_eos

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated turn: the terminator (when one token), the model's and tokenizer's eos."""
        ids = set(self.generation_eos)
        if len(self.ids) == 1:
            ids.add(self.ids[0])
        if self.tokenizer_eos is not None:
            ids.add(self.tokenizer_eos)
        return sorted(ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "ids": list(self.ids),
            "generationEos": list(self.generation_eos),
            "inGenerationConfig": self.in_generation_config,
            "stopIds": self.stop_ids,
        }


def _render(tokenizer: Any, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def _tail_after(tokenizer: Any, messages: list[dict], answer: str, until: str | None) -> str:
    text = _render(tokenizer, messages)
    at = text.find(answer)
    if at < 0:
        raise UsageError("The chat template drops the assistant's answer; it cannot be trained on.")
    tail = text[at + len(answer) :]
    if until is not None and until in tail:
        tail = tail[: tail.index(until)]
    return tail


def _cannot_render(said: str) -> UsageError:
    return UsageError(
        f"The chat template cannot render a simple conversation: {said.rstrip('.')}; fix it, or choose another "
        f"(--chatTemplate: {', '.join(bundled_names())}, or a .jinja file)."
    )


def _syntax_problem(text: str) -> str | None:
    """Why Jinja cannot parse `text` ("Unexpected end of template … (line 3)"), or None. Parsed as transformers
    parses chat templates: with loop controls and its `{% generation %}` block."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    try:
        ImmutableSandboxedEnvironment(extensions=[Generation, loopcontrols]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"{exc.message.rstrip('.')} (line {exc.lineno})" if exc.message else f"line {exc.lineno}"
    return None


def detect_terminator_text(tokenizer: Any) -> str:
    """The text the template emits right after an assistant answer ("" when it emits nothing)."""
    u1, u2 = ({"role": "user", "content": c} for c in _PROBE_USER)
    a1, a2 = ({"role": "assistant", "content": c} for c in _PROBE_ANSWER)
    try:
        end = _tail_after(tokenizer, [u1, a1], a1["content"], None)
    except UsageError:
        raise
    except Exception as exc:  # a template that raises on a plain user/assistant exchange (jinja errors)
        raise _cannot_render(str(exc)) from exc
    try:
        between = _tail_after(tokenizer, [u1, a1, u2, a2], a1["content"], u2["content"])
    except Exception:  # only the single-turn render is usable
        between = None
    tail = end if between is None else _common_token_prefix(tokenizer, end, between)
    return tail.strip()


def _common_token_prefix(tokenizer: Any, a: str, b: str) -> str:
    """The longest common prefix of `a` and `b` in whole tokens (a character prefix could cut a marker
    such as `<|end|>` off `<|endoftext|>` vs `<|user|>`)."""
    ea = tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
    eb = tokenizer(b, add_special_tokens=False)
    n = 0
    for x, y in zip(ea["input_ids"], eb["input_ids"], strict=False):
        if x != y:
            break
        n += 1
    return a[: ea["offset_mapping"][n - 1][1]] if n else ""


def generation_eos(path: str | Path | None) -> tuple[int, ...]:
    """eos_token_id from a model directory's generation_config.json (int or list); () when absent."""
    if path is None:
        return ()
    try:
        raw = json.loads((Path(path) / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    items = raw if isinstance(raw, list) else [raw]
    return tuple(int(x) for x in items if isinstance(x, int))


def turn_terminator(tokenizer: Any, base_info: Any = None) -> Terminator:
    """The template's turn terminator, cross-checked with the base model's generation_config.json.
    Raises UsageError when the template closes assistant turns with nothing."""
    text = detect_terminator_text(tokenizer)
    if not text:
        raise UsageError(
            "The chat template emits nothing after an assistant answer, so a model could never learn "
            "where its turn ends; choose a template that closes assistant turns (--chatTemplate)."
        )
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Terminator(text, ids, generation_eos(getattr(base_info, "path", None)), tokenizer.eos_token_id)


# --- which template -----------------------------------------------------------------------------


def bundled_names() -> list[str]:
    root = resources.files("lunatrain") / "resources" / "templates"
    return sorted(e.name[: -len(".jinja")] for e in root.iterdir() if e.name.endswith(".jinja"))


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"chatTemplate {name!r} is not a template name; name a bundled template "
            f"({', '.join(bundled_names())}) or pass a .jinja file on the command line."
        )
    return name


def load_template(name: str, settings: Any) -> str:
    """The Jinja source of a bundled template or one stored under <home>/data/templates/."""
    check_name(name)
    stored = Path(settings.data_dir) / "templates" / f"{name}.jinja"
    bundled = resources.files("lunatrain") / "resources" / "templates" / f"{name}.jinja"
    if bundled.is_file():
        return bundled.read_text(encoding="utf-8")
    if stored.is_file():
        return stored.read_text(encoding="utf-8")
    raise UsageError(f"Unknown chatTemplate {name!r}; bundled templates: {', '.join(bundled_names())}.")


def store_template(path: str | Path, settings: Any) -> str:
    """Copy a user's .jinja file under <home>/data/templates/ and return the name that selects it
    (content-addressed, so a changed file is a new name and old adapters keep theirs)."""
    from .fsio import atomic_write_text

    src = Path(path).expanduser()
    if src.suffix != ".jinja" or not src.is_file():
        raise UsageError(f"chatTemplate file {str(path)!r} is not a readable .jinja file.")
    try:
        # utf-8-sig: a byte-order mark ("UTF-8 with BOM") would be the first character of every prompt
        text = src.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"chatTemplate file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8."
        ) from None
    except OSError as exc:
        raise UsageError(f"chatTemplate file {str(path)!r} cannot be read: {exc.strerror or exc}.") from None
    # Refused before it is stored: a file that is no template would lie under data/templates for good.
    if not text.strip():
        raise UsageError(f"chatTemplate file {str(path)!r} is empty.")
    if problem := _syntax_problem(text):
        raise _cannot_render(problem)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", src.stem).strip("-")[:40] or "template"
    name = f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    atomic_write_text(Path(settings.data_dir) / "templates" / f"{name}.jinja", text)
    return name


def cli_template(value: str, settings: Any) -> str:
    """A command line's chatTemplate: a template name as is, a .jinja file stored and named."""
    if value.endswith(".jinja") or "/" in value or "\\" in value:
        return store_template(value, settings)
    return check_name(value)


def apply_template(tokenizer: Any, name: str | None, settings: Any, model_id: str) -> list[str]:
    """Put the chosen template on `tokenizer` and add the marker tokens it needs that the vocabulary lacks.
    Returns the added token strings. Raises UsageError when there is no template at all."""
    if name:
        tokenizer.chat_template = load_template(name, settings)
    if not tokenizer.chat_template:
        raise UsageError(
            f"Base model {model_id!r} has no chat template; choose one with --chatTemplate "
            f"({', '.join(bundled_names())}, or a .jinja file)."
        )
    if not name:
        return []
    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    missing = sorted({m for m in _MARKER.findall(source) if m not in vocab})
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def added_token_ids(tokenizer: Any, added: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in added]


def check_embedding_room(rows: int, tokenizer: Any, added: list[str], model_id: str) -> list[int]:
    """Ids of the added tokens, which must fit the model's `rows` embedding rows (never resized, so the adapter
    stays loadable on the unmodified base)."""
    ids = added_token_ids(tokenizer, added)
    if ids and max(ids) >= rows:
        raise UsageError(
            f"The chat template needs {counted(len(ids), 'token')} ({', '.join(added)}) that base model "
            f"{model_id!r} has no spare embedding rows for ({rows} rows); choose a template "
            "built from its own special tokens."
        )
    return ids


# --- what ships with adapters and merged models ---------------------------------------------------


def write_generation_config(
    directory: str | Path, base_path: str | Path, terminator: Terminator, tokenizer: Any
) -> dict[str, Any]:
    """Write directory/generation_config.json: the base model's, with the turn terminator among its eos ids,
    so plain `generate()` stops where training taught the model to stop."""
    from .fsio import atomic_write_json

    try:
        config = json.loads((Path(base_path) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    config.pop("transformers_version", None)
    eos = list(generation_eos(base_path))
    for tid in terminator.stop_ids:
        if tid not in eos:
            eos.append(tid)
    config["eos_token_id"] = eos
    if config.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        config["pad_token_id"] = tokenizer.pad_token_id
    atomic_write_json(Path(directory) / "generation_config.json", config)
    return config
