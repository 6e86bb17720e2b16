"""Every message code the server can emit has a German and an English text in the dashboard.

The codes are collected from the Python sources (the places that set an error, job, check, gate-reason,
adapter-state or log code), so a new code without a registry entry or a translation fails here.
Run: `pytest tests/test_messages.py -q`
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from lunatrain.messages import CODES, coded

SRC = Path(__file__).resolve().parent.parent / "src" / "lunatrain"
I18N = SRC / "api" / "static" / "i18n.js"
CODE = r"([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)"
# Where a code is set: keyword or attribute `code = "x"`, a dict `"code": "x"`, `coded("x", …)`, a gate note
# `Note("x", …)`, a training stop `Stop(Status.X, "x", …)`, the guard's `reply(send, 400, "x", …)`, the HTTP
# layer's {404: "x"}, a fallback `or "x"` after reading a code, the worker's `"x" if … else "y"`, an adapter state
# `state(…, "x", …)`, and a helper's default `code: str = "x"` (its callers pass others as `code="y"`).
PATTERNS = [
    rf'\bcode\s*=\s*"{CODE}"',
    rf'\bcode:\s*str\s*=\s*"{CODE}"',
    rf'"code":\s*"{CODE}"',
    rf'\bcoded\(\s*"{CODE}"',
    rf'\bNote\(\s*"{CODE}"',
    rf'Stop\(Status\.\w+,\s*"{CODE}"',
    rf'\b_?reply\(\s*send,\s*\w+,\s*"{CODE}"',
    rf'\b\d{{3}}:\s*"{CODE}"',
    rf'get\("code"\)\s*or\s*"{CODE}"',
    rf'code\s*=\s*"{CODE}"\s+if\b.*\belse\s+"{CODE}"',
    rf'\bstate\(\w+,\s*"{CODE}"',
    r'"(check\.[a-z_]+\.[a-z_]+)"',
]


def _source_codes() -> set[str]:
    found: set[str] = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in PATTERNS:
            for match in re.finditer(pattern, text):
                found.update(g for g in match.groups() if g)
        # record checks build their codes from the id: check.<id>.ok / check.<id>.found
        for cid in re.findall(r'\b_check\(\s*"(\w+)"', text):
            found |= {f"check.{cid}.ok", f"check.{cid}.found"}
    return found


def _texts(lang: str) -> dict[str, str]:
    source = I18N.read_text(encoding="utf-8")
    block = re.search(rf"^const {lang} = \{{\n(.*?)^\}};", source, re.S | re.M)
    assert block, f"no `const {lang} = {{…}};` in i18n.js"
    return dict(re.findall(r'^\s*"([^"]+)":\s*"((?:[^"\\]|\\.)*)",?$', block.group(1), re.M))


def test_the_sources_use_only_registered_codes():
    found = _source_codes()
    assert len(found) > 60  # the collection itself works (errors, jobs, checks, gate, states, logs)
    assert {
        "not_found",
        "nan_loss",
        "bad_host",
        "check.volume.too_few",
        "gate.loss_regression",
        "adapter.other_base",
        "log.epoch_done",
        "child_crashed",
    } <= found
    missing = sorted(found - set(CODES))
    assert missing == [], f"codes used in the sources but not registered in messages.CODES: {missing}"


@pytest.mark.parametrize("lang", ["de", "en"])
def test_every_code_has_a_text_in_both_languages(lang):
    texts = _texts(lang)
    missing = sorted(code for code in CODES if f"msg.{code}" not in texts)
    assert missing == [], f"i18n.js ({lang}) has no msg.<code> for: {missing}"
    # a placeholder in a text must be a parameter the code documents (its description names them)
    for code, description in CODES.items():
        for name in re.findall(r"\{(\w+)(?::[^{}|]*\|[^{}]*)?\}", texts[f"msg.{code}"]):
            assert name in description, f"msg.{code} ({lang}) uses {{{name}}}, not among its parameters: {description}"


def test_german_texts_are_german():
    de, en = _texts("de"), _texts("en")
    same = [k for k in CODES if de[f"msg.{k}"] == en[f"msg.{k}"]]
    assert same == [], f"not translated: {same}"


def test_a_note_reads_as_its_sentence_and_copies_with_its_code():
    """Review repro: a gate note could not be copied or pickled (str's own arguments left out its code)."""
    import copy
    import pickle

    from lunatrain.messages import Note

    note = Note("gate.no_eval_samples", "the curated export has no val or test samples", tier="curated")
    assert note == "the curated export has no val or test samples" and note.startswith("the curated")
    for again in (copy.copy(note), copy.deepcopy(note), pickle.loads(pickle.dumps(note))):
        assert again == note and again.coded == {"code": "gate.no_eval_samples", "params": {"tier": "curated"}}


def test_an_unregistered_code_is_refused_at_once():
    with pytest.raises(KeyError, match="not registered"):
        coded("made.up")


def test_every_key_the_dashboard_asks_for_has_a_text_in_both_languages():
    """Repro: the job details showed the raw key `job.status` (no text in either language), and a gate the
    trainer settled as `interrupted` would have shown `gate.interrupted`."""
    from lunatrain.service.jobs import Status
    from lunatrain.service.recovery import GATE_INTERRUPTED

    static = SRC / "api" / "static"
    keys = set()
    for js in static.glob("*.js"):
        keys |= set(re.findall(r'\bt\(\s*"([A-Za-z0-9_.]+)"', js.read_text(encoding="utf-8")))
    html = (static / "index.html").read_text(encoding="utf-8")
    keys |= set(re.findall(r'data-i18n="([A-Za-z0-9_.]+)"', html))
    keys |= {key for pair in re.findall(r'data-i18n-attr="([^"]+)"', html) for key in re.findall(r":([\w.]+)", pair)}
    assert len(keys) > 100  # the collection itself works
    # keys built from a value: a job's status and the gate's status (passed, failed, error, interrupted)
    keys |= {f"state.{s}" for s in get_args(Status)}
    keys |= {f"gate.{s}" for s in ("passed", "failed", "error", GATE_INTERRUPTED["status"])}
    for lang in ("de", "en"):
        missing = sorted(keys - set(_texts(lang)))
        assert missing == [], f"i18n.js ({lang}) has no text for: {missing}"


def test_a_count_of_one_has_its_own_wording_in_both_languages():
    """Repro: the dashboard said "1 Beispiele mit leerer Antwort" / "1 samples with an empty response". A text
    counting records has a `.one` variant (tMsg takes it for count 1) with the same placeholders."""
    de, en = _texts("de"), _texts("en")
    counted = sorted(k for k in de if k.startswith("msg.check.") and "{count}" in de[k] and not k.endswith(".one"))
    assert len(counted) >= 10  # the found-checks and the val split
    for lang, texts in (("de", de), ("en", en)):
        missing = [k for k in counted if f"{k}.one" not in texts]
        assert missing == [], f"i18n.js ({lang}) has no singular text for: {missing}"
        for key in counted:
            assert set(re.findall(r"\{(\w+)\}", texts[f"{key}.one"])) == set(re.findall(r"\{(\w+)\}", texts[key])), key
    assert de["msg.check.empty_response.found.one"] == "{count} Beispiel mit leerer Antwort"
