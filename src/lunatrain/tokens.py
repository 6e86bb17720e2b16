"""Chat tokenization with assistant-only labels, and the tokenized-data cache shared by preflight and training.

Which tokens train: the content of **every** assistant turn plus the turn terminator that closes it (what
the chat template emits after the answer, `templates.turn_terminator`, often not the eos token), so the
model learns to stop; system and user turns, role headers and the template's glue are masked with -100.
Training all assistant turns (not only the last) is what chat fine-tuning tools do by default; a
multi-turn example then teaches each of its answers in context. An assistant turn with `"weight": 0`
(OpenAI's fine-tuning format) is context only: rendered, and masked like a user turn. Thinking templates
that drop the `<think>…</think>` block of earlier turns train what they render: those turns' answers
without it.

How the spans are found, for any chat template: the conversation is rendered once as text and tokenized
once (with character offsets); each assistant turn's character span is found by rendering the prefix
before it with `add_generation_prompt=True` (where the answer starts) and the prefix including it (where
the turn ends). Labels come from that single tokenization, so BPE merges across a span boundary can never
shift them. Templates that re-render earlier turns differently (so a prefix is not a prefix of the whole)
fall back to locating each answer's text in order, after the message before it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .fsio import atomic_write_bytes
from .settings import Settings

IGNORE = -100
SPLITS = ("train", "val", "test")
# bump when Encoded or the masking rule changes (2: the template's terminator, not eos; 3: an answer located
# by its text is searched after the message before it; a long conversation loses its oldest exchanges; 4: a
# cut that loses no trained token, only the template's own tokens after the last terminator, is no truncation
# and drops no exchange; 5: nor does a part kept after dropping exchanges count such tokens against the limit)
CACHE_FORMAT = 5


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not trained
    truncated: bool = False  # cut at max_seq_length, losing trained tokens: even its last exchange is longer
    full_length: int = 0  # token count of the whole conversation, before anything was left out or cut
    hash: str = ""  # the export record's hash (which samples an adapter was trained on)
    dropped: int = 0  # messages left out from the start (its oldest exchanges) to fit max_seq_length

    @property
    def shortened(self) -> bool:
        """Longer than max_seq_length: oldest exchanges left out, or cut at the end."""
        return self.truncated or self.dropped > 0

    @property
    def n_supervised(self) -> int:
        return _trained(self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer: Any, messages: list[dict], *, gen_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


class TurnDropped(UsageError):
    """The rendered conversation lacks an assistant turn's text: the template drops or rewrites it."""

    def __init__(self, turn: int) -> None:
        self.reason = f"it drops or rewrites assistant turn {turn}, which therefore cannot be trained on"
        super().__init__(f"The chat template {self.reason}.")


def assistant_spans(
    tokenizer: Any, messages: list[dict], terminator: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each trained assistant turn's text
    (content + turn terminator; `terminator` defaults to the one the template emits). A turn with weight 0 is
    located all the same (the next one is searched after it) but not trained, and may be dropped by the
    template."""
    text = _render(tokenizer, messages, gen_prompt=False)
    if terminator is None:
        from .templates import detect_terminator_text

        terminator = detect_terminator_text(tokenizer)
    eot = terminator  # "" (a template without one) trains the answer alone; prepare refuses such templates
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        content = str(msg.get("content") or "")
        span = _span_by_prefix(tokenizer, messages, i, text, content, eot)
        if span is None:
            span = _span_by_search(text, content, eot, _after_prompt(tokenizer, text, messages, i, cursor))
        trained = msg.get("weight", 1) != 0
        if span is None and trained:
            raise TurnDropped(i + 1)
        if span is None:
            continue
        if trained:
            spans.append(span)
        cursor = span[1]
    return text, spans


def reasoning_dropped(tokenizer: Any, messages: list[dict]) -> bool:
    """Whether the chat template drops the `<think>…</think>` reasoning of the conversation's last trained
    answer (DeepSeek-R1's strips it from every answer): that answer trains without the reasoning the data gives
    it. Dropping it from earlier turns is what thinking templates do (Qwen3's), and is not asked here."""
    last = next((m for m in reversed(messages) if m.get("role") == "assistant" and m.get("weight", 1) != 0), None)
    content = str((last or {}).get("content") or "")
    reasoning = content.rsplit("</think>", 1)[0].split("<think>")[-1].strip() if "</think>" in content else ""
    return bool(reasoning) and _template_drops(tokenizer, str(tokenizer.chat_template), "reasoning")


def system_dropped(tokenizer: Any, messages: list[dict]) -> bool:
    """Whether the chat template leaves the conversation's system message out of its rendering (Mistral v0.3's
    writes it into the last user turn only, so never into a conversation that ends with an answer): the sample
    trains without it, while chat and the eval gate ask with it."""
    system = messages[0] if messages and messages[0].get("role") == "system" else None
    has_system = bool(str((system or {}).get("content") or "").strip())
    return has_system and _template_drops(tokenizer, str(tokenizer.chat_template), "system")


# Letters only, as `_STAND_IN`: a template that trims or escapes text leaves them as they are.
_PROBE_SYSTEM, _PROBE_REASONING = "lunatrainsystem7f3a", "lunatrainreasoning7f3a"


@functools.lru_cache(maxsize=32)
def _template_drops(tokenizer: Any, template: str, part: str) -> bool:
    """Whether the template (`template`: the tokenizer's, the cache's key as it may be replaced) leaves `part`
    ("system": a system message; "reasoning": the last answer's `<think>` block) out of a conversation that
    ends with an answer. Asked once on a probe, not on each sample: what a template drops is its own rule, and
    rendering every sample again would double prepare's work on a large export."""
    user, answer = {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}
    if part == "system":
        probe, text = [{"role": "system", "content": _PROBE_SYSTEM}, user, answer], _PROBE_SYSTEM
    else:
        probe, text = [user, answer | {"content": f"<think>\n{_PROBE_REASONING}\n</think>\n\nA"}], _PROBE_REASONING
    try:
        return text not in _render(tokenizer, probe, gen_prompt=False)
    except Exception:  # a template that refuses the probe (no system role): its refusals are prepare's to name
        return False


def generation_prompt_gap(tokenizer: Any) -> str | None:
    """What the chat template's generation prompt (what chat and the eval gate ask an answer after) adds
    that training never puts before an answer, or None when it puts exactly that there: DeepSeek-R1's opens
    `<think>\n` in the generation prompt but renders answers without it, so a served model is asked from a
    place it never learned from. Probed with an answer with and without reasoning, after a user turn alone
    first (Mistral v0.3's template writes a system message into the last user turn only, so the prompt and the
    conversation differ by it: not what this check is for); None when the template refuses the probes (its
    refusals are prepare's other checks)."""
    for probe in reversed(_PROBES):
        asked = [m for m in probe if m["role"] != "assistant"]
        try:
            before = _render(tokenizer, asked, gen_prompt=True)
            turns = [
                _render(tokenizer, [*asked, {"role": "assistant", "content": answer}], gen_prompt=False)
                for answer in ("A", "<think>\nR\n</think>\n\nA")
            ]
        except Exception:  # this shape refused (no system role): the next probe
            continue
        if any(turn.startswith(before) for turn in turns):
            return None
        shared = len(os.path.commonprefix([before, *turns]))
        return before[shared:]
    return None


def _span_by_prefix(tok: Any, messages: list[dict], i: int, text: str, content: str, eot: str):
    try:
        before = _render(tok, messages[:i], gen_prompt=True) if i else None
        upto = _render(tok, messages[: i + 1], gen_prompt=False)
    except Exception:  # templates that refuse partial conversations (e.g. must end with a user turn)
        return None
    if before is None:  # no prefix to render: the answer starts where its own header ends
        start = _find(upto, content, 0)[0] if content.strip() else -1
        if start < 0:
            return None
    else:
        if not (upto.startswith(before) and text.startswith(upto)):
            return None
        start = len(before)
    return start, _turn_end(upto, start, content, eot)


def _visible(content: str) -> list[str]:
    """How an answer may appear in the rendered text: as written, or (thinking templates that drop the
    `<think>…</think>` block of earlier turns) only the part after the reasoning."""
    stripped = content.strip()
    answer = stripped.rsplit("</think>", 1)[-1].strip()
    return [stripped] + ([answer] if answer and answer != stripped else [])


def _find(text: str, content: str, start: int) -> tuple[int, int]:
    """[at, end) of the answer's visible text in `text` from `start`; (-1, -1) when absent."""
    for form in _visible(content):
        at = text.find(form, start)
        if at >= 0:
            return at, at + len(form)
    return -1, -1


def _turn_end(rendered: str, start: int, content: str, eot: str) -> int:
    """End of the trained text: just after the turn terminator that follows the content when there is one
    (the newline a template puts after it is never generated, so it is not trained)."""
    at, after = _find(rendered, content, start) if content.strip() else (start, start)
    if at < 0:
        after = start
    if eot:
        k = rendered.find(eot, after)
        if k >= 0 and not rendered[after:k].strip():
            return k + len(eot)
    return len(rendered.rstrip()) if at < 0 else max(after, start)


_STAND_IN = "lunatrainprompt7f3a"  # letters only: a template that trims or escapes text leaves it as it is


def _after_prompt(tokenizer: Any, text: str, messages: list[dict], i: int, cursor: int) -> int:
    """Where assistant turn i's answer can start at the earliest: after the text of the message before it
    when that is found after `cursor` (the end of the previous answer), and after the header the template
    writes between the two. An answer that repeats the end of the user's message ("… bestätige: 17 × 3 =
    51." → "17 × 3 = 51.") is then not found inside it, nor a short one inside the header ("ist" in Phi-3's
    `<|end|>\n<|assistant|>\n`, which would leave that answer untrained)."""
    if i == 0 or messages[i - 1].get("role") == "assistant":
        return cursor
    prompt = str(messages[i - 1].get("content") or "").strip()
    if not prompt:
        return cursor
    # The header: what the template writes after that message when an answer follows, read after a stand-in
    # for its text (the text itself may also stand in the header: ">" in `<|assistant|>`).
    probe = [*messages[: i - 1], {**messages[i - 1], "content": _STAND_IN}]
    try:
        opened = _render(tokenizer, probe, gen_prompt=True)
    except Exception:  # a template that refuses the partial conversation: no header to skip
        opened = ""
    k = opened.rfind(_STAND_IN)
    header = opened[k + len(_STAND_IN) :] if k >= 0 else ""
    # The prompt where the header follows it: a prompt such as "user" also stands inside `<|user|>`.
    if header and (at := text.find(prompt + header, cursor)) >= 0:
        return at + len(prompt) + len(header)
    at = text.find(prompt, cursor)
    return at + len(prompt) if at >= 0 else cursor


def _span_by_search(text: str, content: str, eot: str, cursor: int):
    if not content.strip():
        return None
    at, _end = _find(text, content, cursor)
    if at < 0:
        return None
    return at, _turn_end(text, at, content, eot)


def encode_chat(
    tokenizer: Any, messages: list[dict], max_seq_length: int, *, hash: str = "", terminator: str | None = None
) -> Encoded:
    """Tokenize one conversation with its chat template; labels only on assistant content + terminator.

    A conversation longer than `max_seq_length` tokens loses its oldest exchanges (`dropped` messages after
    the system prompt), as few as make it fit: its last answer is the example's own, and the turns just
    before it are its context, as a chat that outgrows its context window keeps them. Where even the last
    exchange does not fit, that exchange is cut at the limit (`truncated=True` when the cut loses trained tokens).
    """
    ids, labels = _encode(tokenizer, messages, terminator)
    full = len(ids)
    if full <= max_seq_length or not _trained(labels[max_seq_length:]):
        # it fits, but for the template's own tokens after its last terminator (ChatML's newline): cut there
        return Encoded(ids[:max_seq_length], labels[:max_seq_length], False, full, hash)
    head = next((k for k, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    # Where a kept part may start: a user turn after the first exchange, with an answer to train after it.
    trained = [k for k, m in enumerate(messages) if m.get("role") == "assistant" and m.get("weight", 1) != 0]
    starts = [k for k in range(head + 1, len(messages)) if messages[k].get("role") == "user" and trained[-1:] > [k]]
    kept, dropped = (ids, labels), 0

    def fitting(i: int) -> tuple[list[int], list[int]] | None:
        try:
            part = _encode(tokenizer, messages[:head] + messages[starts[i] :], terminator)
        except Exception:  # a template that refuses the part starting here: as if it did not fit
            return None
        # it fits when what is over the limit trains nothing (the template's own tokens after its terminator)
        return part if len(part[0]) <= max_seq_length or not _trained(part[1][max_seq_length:]) else None

    # The earliest start that fits (fewer tokens the later it starts): grown from the end by doubling steps,
    # then bisected between the last start that fit and the first that did not, so each part encoded is at
    # most about twice what fits, however long the conversation.
    lo, hi, step = -1, len(starts), 1  # starts[lo] does not fit (or is refused), starts[hi] is the best yet
    while hi - 1 > lo:
        probe = max(hi - step, lo + 1)
        part = fitting(probe)
        if part is None:
            lo = probe
            break
        kept, dropped, hi, step = part, starts[probe] - head, probe, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        part = fitting(mid)
        if part is None:
            lo = mid
        else:
            kept, dropped, hi = part, starts[mid] - head, mid
    if not dropped and starts:  # nothing fits: the last exchange from its start, cut at the limit, unless
        # that trains less than the whole conversation cut at the limit (a last question longer than it)
        try:
            last = _encode(tokenizer, messages[:head] + messages[starts[-1] :], terminator)
        except Exception:
            last = None
        if last is not None and _trained(last[1][:max_seq_length]) >= _trained(labels[:max_seq_length]):
            kept, dropped = last, starts[-1] - head
    ids, labels = kept
    # Truncated when the cut loses trained tokens: a template's own newline after the last terminator is no loss.
    cut = _trained(labels[max_seq_length:]) > 0
    return Encoded(ids[:max_seq_length], labels[:max_seq_length], cut, full, hash, dropped)


def _trained(labels: list[int]) -> int:
    return sum(1 for x in labels if x != IGNORE)


def _encode(tokenizer: Any, messages: list[dict], terminator: str | None) -> tuple[list[int], list[int]]:
    """The conversation's token ids, and its labels: the ids where trained, IGNORE elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, terminator)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    s = 0
    for j, (a, _b) in enumerate(enc["offset_mapping"]):
        while s < len(spans) and a >= spans[s][1]:
            s += 1
        if s < len(spans) and spans[s][0] <= a < spans[s][1]:
            labels[j] = ids[j]
    return ids, labels


# --- the tokenized cache --------------------------------------------------------------------------


@dataclass
class TokenizedTier:
    tier: str
    key: str  # cache key: dataset fingerprint + tokenizer + template + terminator + max length
    fingerprint: str  # the dataset fingerprint the tokens came from
    max_seq_length: int
    cache_hit: bool
    path: Path
    splits: dict[str, list[Encoded]] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    terminator: Any = None  # templates.Terminator the labels end each turn with

    @property
    def train(self) -> list[Encoded]:
        return self.splits.get("train", [])

    @property
    def val(self) -> list[Encoded]:
        return self.splits.get("val", [])

    @property
    def test(self) -> list[Encoded]:
        return self.splits.get("test", [])

    def longer_than(self, limit: int) -> dict[str, list[int]]:
        """Per split, the positions of the samples that keep more than `limit` tokens (prepare names them, the
        run refuses them: one answer for both, every split the gate measures included)."""
        return {name: [i for i, e in enumerate(items) if len(e) > limit] for name, items in self.splits.items()}


def cache_key(
    fingerprint: str, tier: str, tok_hash: str, tmpl_hash: str, max_seq_length: int, terminator: str = ""
) -> str:
    ident = {
        "terminator": terminator,
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "tier": tier,
        "tokenizer": tok_hash,
        "template": tmpl_hash,
        "maxSeqLength": max_seq_length,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def tokenize_tier(
    settings: Settings, tier: str, tokenizer: Any, max_seq_length: int, *, data: Any = None, base: Any = None
) -> TokenizedTier:
    """Tokenized train/val/test of an exported tier, from the cache when the same data, tokenizer, template
    and max length were tokenized before. `data` (a TierData) skips re-reading the export; `base` (a
    BaseModelInfo) lets the terminator be cross-checked with its generation_config.json."""
    from .models import template_hash, tokenizer_hash
    from .templates import turn_terminator

    if data is None:
        from .export import read_tier

        data = read_tier(settings, tier)
    term = turn_terminator(tokenizer, base)
    key = cache_key(
        data.fingerprint, tier, tokenizer_hash(tokenizer), template_hash(tokenizer), max_seq_length, term.text
    )
    path = settings.cache_dir / "tokens" / f"{tier}-{key[:32]}.safetensors"
    splits = _read_cache(path, key)
    hit = splits is not None
    if splits is None:
        splits = {
            name: [encode_record(tokenizer, rec, max_seq_length, term.text) for rec in getattr(data, name)]
            for name in SPLITS
        }
        _write_cache(path, key, splits, data.fingerprint)
        _share_values(splits)  # read from the cache, they are shared already
    stats = {name: split_stats(items) for name, items in splits.items()}
    return TokenizedTier(tier, key, data.fingerprint, max_seq_length, hit, path, splits, stats, term)


def _share_values(splits: dict[str, list[Encoded]]) -> None:
    """Every token id and label of the tier held as one Python int per distinct value. A list of ids as the
    tokenizer or a tensor's `tolist()` gives them holds a 28-byte int object per token beside its 8-byte
    slot (-100 included, once per masked token): about 72 bytes a token for ids and labels, 1.4 GB for a
    50,000-conversation tier the memory plan did not count. Shared, a token costs its two slots."""
    pool: dict[int, int] = {IGNORE: IGNORE}
    for items in splits.values():
        for enc in items:
            enc.input_ids, enc.labels = _shared(enc.input_ids, pool), _shared(enc.labels, pool)


def _shared(values: list[int], pool: dict[int, int]) -> list[int]:
    """`values` with each int taken from `pool` (its first occurrence kept there)."""
    return [pool.setdefault(v, v) for v in values]


class TemplateRefused(UsageError):
    """The chat template raised on one example (its own raise_exception). `record_id` and `reason` let
    prepare collect every refused example into one check instead of stopping at the first."""

    def __init__(self, record_id: str, reason: str) -> None:
        super().__init__(
            f"The chat template refuses example {record_id}: {reason}; fix the example or choose another "
            "template (--chatTemplate).",
            code="template.refuses_example",  # for a reader in another language (the dashboard's job panel)
            params={"example": record_id, "reason": reason},
        )
        self.record_id, self.reason = record_id, reason


def encode_record(tokenizer: Any, rec: dict, max_seq_length: int, terminator: str) -> Encoded:
    """One exported record's tokens and labels; TemplateRefused when the chat template raises on it."""
    try:
        return encode_chat(
            tokenizer, rec["messages"], max_seq_length, hash=str(rec.get("hash", "")), terminator=terminator
        )
    except TurnDropped as exc:  # named with its example, and collected by prepare like a refusal
        raise TemplateRefused(_record_id(rec), exc.reason) from exc
    except UsageError:
        raise
    except Exception as exc:  # the template's own raise_exception (e.g. no system role, roles must alternate)
        raise TemplateRefused(_record_id(rec), str(exc)) from exc


def _record_id(rec: dict) -> str:
    return str(rec.get("id") or str(rec.get("hash", ""))[:12])


def split_stats(items: list[Encoded]) -> dict[str, Any]:
    lengths = sorted(e.full_length for e in items)
    sup = [e.n_supervised for e in items]

    def pct(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * (len(lengths) - 1) + 0.5))] if lengths else 0

    return {
        "count": len(items),
        "tokens": sum(len(e) for e in items),
        "supervisedTokens": sum(sup),
        "truncated": sum(1 for e in items if e.shortened),  # longer than maxSeqLength, whichever way shortened
        "noSupervised": sum(1 for s in sup if s == 0),
        "minLength": lengths[0] if lengths else 0,
        "medianLength": int(statistics.median(lengths)) if lengths else 0,
        "p95Length": pct(0.95),
        "maxLength": lengths[-1] if lengths else 0,
    }


def _write_cache(path: Path, key: str, splits: dict[str, list[Encoded]], fingerprint: str = "") -> None:
    """One safetensors file (no pickle): per split the flat ids and labels, offsets, flags and hashes. The
    dataset fingerprint in the metadata lets retention keep only caches of the current export."""
    import torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for name, items in splits.items():
        lengths = [len(e) for e in items]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        tensors[f"{name}.input_ids"] = torch.tensor([t for e in items for t in e.input_ids], dtype=torch.int32)
        tensors[f"{name}.labels"] = torch.tensor([t for e in items for t in e.labels], dtype=torch.int32)
        tensors[f"{name}.offsets"] = torch.tensor(offsets, dtype=torch.int64)
        tensors[f"{name}.truncated"] = torch.tensor([e.truncated for e in items], dtype=torch.uint8)
        tensors[f"{name}.full_length"] = torch.tensor([e.full_length for e in items], dtype=torch.int64)
        tensors[f"{name}.dropped"] = torch.tensor([e.dropped for e in items], dtype=torch.int64)
        hashes = "\n".join(e.hash for e in items).encode("utf-8")
        tensors[f"{name}.hashes"] = (
            torch.frombuffer(bytearray(hashes), dtype=torch.uint8) if hashes else torch.zeros(0, dtype=torch.uint8)
        )
    meta = {"key": key, "format": str(CACHE_FORMAT), "fingerprint": fingerprint, "sha256": _digest(tensors)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _digest(tensors: dict[str, Any]) -> str:
    """sha256 over every tensor's name and bytes, in name order: a cache whose data (not its header) was
    overwritten or torn in place reads as a miss and is rebuilt, instead of training on wrong tokens."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        data = tensors[name].contiguous().numpy()  # hashed in place: no copy of a tier's tokens (hundreds of MB)
        h.update(f"{name}:{data.nbytes}\n".encode())
        h.update(memoryview(data).cast("B"))
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, list[Encoded]] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        if meta.get("sha256") != _digest(tensors):  # damaged in place, or written before caches had a digest
            return None
        splits = {}
        pool: dict[int, int] = {IGNORE: IGNORE}  # one object per distinct value (`_share_values`)
        for name in SPLITS:
            ids = tensors[f"{name}.input_ids"]
            labels = tensors[f"{name}.labels"]
            offsets = tensors[f"{name}.offsets"].tolist()
            trunc = tensors[f"{name}.truncated"].tolist()
            full = tensors[f"{name}.full_length"].tolist()
            dropped = tensors[f"{name}.dropped"].tolist()
            raw = tensors[f"{name}.hashes"].numpy().tobytes().decode("utf-8")
            n = len(offsets) - 1
            hashes = raw.split("\n") if n else []
            if len(hashes) != n:
                hashes = [""] * n
            # per sample, not the whole split at once: its `tolist()` would hold an int object per token
            splits[name] = [
                Encoded(
                    _shared(ids[a:b].tolist(), pool),
                    _shared(labels[a:b].tolist(), pool),
                    bool(trunc[i]),
                    int(full[i]),
                    hashes[i],
                    int(dropped[i]),
                )
                for i, (a, b) in enumerate(zip(offsets, offsets[1:], strict=False))
            ]
        return splits
    except Exception:  # a damaged or foreign cache file is simply rebuilt
        return None


# --- packing: samples → model rows ----------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch laid out as rows. Samples sit side by side in a row with position ids restarting at
    0, which (with no attention mask and no KV cache) makes transformers build a block-diagonal causal mask:
    no sample attends to another. Unused row space is one pad block with its own positions, so it is
    isolated the same way and needs no attention mask either.

    The flat layout is one row with no padding at all, plus `cu_seqlens` (cumulative sample lengths) for
    the per-sample attention in `kernels`; with plain SDPA the position ids still isolate the samples."""

    input_ids: Any  # LongTensor [rows, length]
    position_ids: Any  # LongTensor [rows, length]
    targets: Any  # LongTensor [rows, length]: the next token to predict at each position, IGNORE if none
    segments: list[tuple[int, int, int]]  # per sample: (row, start, end)
    n_tokens: int  # real (non-pad) tokens
    n_supervised: int  # positions with a target
    cu_seqlens: Any = None  # IntTensor [samples + 1] in the flat layout, else None
    max_length: int = 0  # longest sample (flat layout)

    @property
    def mask(self) -> Any:
        return self.targets != IGNORE

    def model_inputs(self, device: str) -> dict[str, Any]:
        """The keyword arguments of a forward pass over this batch on `device`: ids and positions, plus where
        each sample starts in the flat layout (for the per-sample attention in `kernels`)."""
        inputs: dict[str, Any] = {"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device)}
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens.to(device)
            inputs |= {
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": self.max_length,
                "max_length_k": self.max_length,
            }
        return inputs


def shifted_targets(enc: Encoded) -> list[int]:
    """Targets for each position of one sample: the label of the next token, IGNORE at the sample's last
    position. Shifting per sample (before packing) is what keeps the first token of the next sample in a
    row from being predicted from this one."""
    return enc.labels[1:] + [IGNORE]


def pack_rows(lengths: list[int], capacity: int, packing: bool = True) -> list[list[int]]:
    """Indices grouped into rows: first-fit decreasing into rows of `capacity` tokens (a longer sample gets
    a row of its own), or one sample per row when packing is off. Deterministic (stable sort)."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max(capacity, lengths[i]) - lengths[i])
    return rows


def make_batch(
    samples: list[Encoded], capacity: int, pad_id: int, *, packing: bool = True, flat: bool = False
) -> Batch:
    """Lay samples out as first-fit rows of `capacity` tokens (or one padded row each without packing),
    or, with `flat`, as one unpadded row."""
    import torch

    if flat:
        return _flat_batch(samples)
    rows = pack_rows([len(s) for s in samples], capacity, packing)
    width = max(sum(len(samples[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    segments: list[tuple[int, int, int]] = [(0, 0, 0)] * len(samples)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i])
            ids[r, at : at + n] = torch.tensor(samples[i].input_ids)
            pos[r, at : at + n] = torch.arange(n)
            tgt[r, at : at + n] = torch.tensor(shifted_targets(samples[i]))
            segments[i] = (r, at, at + n)
            at += n
        pos[r, at:] = torch.arange(width - at)  # the pad block: its own positions, never a target
    n_sup = int((tgt != IGNORE).sum())
    return Batch(ids, pos, tgt, segments, sum(len(s) for s in samples), n_sup)


def _flat_batch(samples: list[Encoded]) -> Batch:
    import torch

    lengths = [len(s) for s in samples]
    ids = torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.long).unsqueeze(0)
    pos = torch.tensor([i for n in lengths for i in range(n)], dtype=torch.long).unsqueeze(0)
    tgt = torch.tensor([t for s in samples for t in shifted_targets(s)], dtype=torch.long).unsqueeze(0)
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    starts = cu.tolist()
    segments = [(0, starts[i], starts[i + 1]) for i in range(len(samples))]
    n_sup = int((tgt != IGNORE).sum())
    return Batch(ids, pos, tgt, segments, sum(lengths), n_sup, cu, max(lengths, default=0))


def special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Every special token string of the tokenizer, and every other added token its chat template writes as
    markup (longest first, so `<|im_end|>` wins over a prefix). The tokenizer reads every added token typed in
    text as that token, flagged special or not: a ChatML fine-tune that added `<|im_start|>` without the flag
    (as many do) would still take a typed one for a turn header. Added tokens the template never writes
    itself (`<think>` of thinking models, tool-call tags) stay text an answer may contain."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    plain = set()
    for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        (found if getattr(tok, "special", False) else plain).add(str(tok.content))
    found |= _template_markup(tokenizer, plain - found)
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


@functools.lru_cache(maxsize=16)
def hidden_in_answers(tokenizer: Any) -> frozenset[int]:
    """Ids an answer's text leaves out: the tokenizer's named special tokens (bos, eos, pad, …) and the markup
    its chat template writes around messages. A special token the template never writes around a plain
    conversation (`<think>` where a tokenizer flags it special) is part of what the model says: chat keeps it,
    as the eval gate does, so a client can tell reasoning from answer and both judge the same text."""
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    named = {str(t) for t in (getattr(tokenizer, n, None) for n in names) if t}
    flagged = {str(t.content) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values() if t.special}
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[t] for t in named | _template_markup(tokenizer, flagged - named) if t in vocab)


# A conversation that ends with the user, without a generation prompt: no template writes a reasoning block
# or a tool call around it (some open the answer with `<think>` in the generation prompt).
_PROBES = (
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
    [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
)


def _template_markup(tokenizer: Any, candidates: set[str]) -> set[str]:
    """Those of `candidates` (added tokens not flagged special) that the chat template writes around the
    messages of a plain conversation."""
    if not candidates or not getattr(tokenizer, "chat_template", None):
        return set()
    for probe in _PROBES:
        try:
            text = _render(tokenizer, [*probe, {"role": "user", "content": "V"}], gen_prompt=False)
        except Exception:  # a template that refuses this shape (no system role): the next probe
            continue
        # Whitespace is never a marker, added or not: Gemma's tokenizers add runs of newlines, GPT-NeoX's runs
        # of spaces, and every answer has them.
        return {t for t in candidates if t.strip() and t in text}
    return set()


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """One alternation of the tokenizer's special tokens (None: it has none), so text is scanned once per
    message instead of once per special token. A literal special token in message text is read by the
    tokenizer as the control token itself: prepare fails such samples, the chat endpoint refuses them."""
    return _alternation(special_tokens(tokenizer))


def first_special_token(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[int, str] | None:
    """(index, token) of the first message whose text holds one of the tokenizer's special tokens (None: no
    message does): chat refuses such a message, the eval gate leaves such a case out."""
    pattern = special_token_pattern(tokenizer)
    for i, message in enumerate(messages):
        found = pattern.search(message["content"]) if pattern else None
        if found:
            return i, found.group()
    return None


@functools.lru_cache(maxsize=16)
def _alternation(specials: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(map(re.escape, specials))) if specials else None
