"""Chat tokenization, label masking and the tokenized cache. Run: `pytest tests/test_tokens.py -q`."""

from __future__ import annotations

import pytest

from lunatrain import models
from lunatrain.tokens import IGNORE, encode_chat, tokenize_tier

from helpers import make_records, tier_data

CONVO = [
    {"role": "system", "content": "Du bist Luna."},
    {"role": "user", "content": "Wie viel ist 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "Und auf Englisch?"},
    {"role": "assistant", "content": "Two plus two is four."},
]


@pytest.fixture
def tok(settings):
    return models.load_tokenizer(None, settings)


def _runs(enc):
    """Contiguous runs of supervised positions, as (start, end) index pairs."""
    runs, start = [], None
    for i, lab in enumerate(enc.labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_only_assistant_content_and_end_of_turn_are_trained(tok):
    enc = encode_chat(tok, CONVO, 512)
    runs = _runs(enc)
    assert [tok.decode(enc.input_ids[a:b]) for a, b in runs] == [
        "2 + 2 = 4.<|im_end|>",
        "Two plus two is four.<|im_end|>",
    ]
    # labels are the tokens themselves where trained (the shift happens in the loss)
    assert all(lab in (IGNORE, tid) for lab, tid in zip(enc.labels, enc.input_ids, strict=True))
    assert not enc.truncated and enc.full_length == len(enc)
    # the newline after <|im_end|> and the next turn's header are not trained
    a, b = runs[0]
    assert enc.labels[b] == IGNORE and enc.input_ids[b - 1] == tok.eos_token_id


def test_labels_line_up_with_piecewise_tokenization(tok):
    """Tokenizing the whole conversation equals tokenizing its prompt/answer pieces one by one, so the
    trained span is exactly the answer's own tokens (no BPE merge across a boundary)."""
    from lunatrain.tokens import assistant_spans

    text, spans = assistant_spans(tok, CONVO)
    cuts = [0] + [c for span in spans for c in span] + [len(text)]
    pieces = [tok(text[a:b], add_special_tokens=False)["input_ids"] for a, b in zip(cuts, cuts[1:], strict=False)]
    enc = encode_chat(tok, CONVO, 512)
    assert enc.input_ids == [t for p in pieces for t in p]
    assert [enc.input_ids[a:b] for a, b in _runs(enc)] == [pieces[1], pieces[3]]


def test_templates_that_rewrite_earlier_turns_fall_back_to_search(tok):
    # Renders the turn count in every header, so a shorter prefix is not a prefix of the whole text.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ loop.length }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = encode_chat(tok, CONVO, 512)
    assert [tok.decode(enc.input_ids[a:b]) for a, b in _runs(enc)] == [
        "2 + 2 = 4.<|im_end|>",
        "Two plus two is four.<|im_end|>",
    ]


def test_truncation_is_flagged(tok):
    enc = encode_chat(tok, CONVO, 16)
    assert enc.truncated and len(enc) == 16 and enc.full_length > 16 and len(enc.labels) == 16


def long_conversation(exchanges: int = 10) -> list[dict]:
    out = [{"role": "system", "content": "Du bist Luna."}]
    for i in range(exchanges):
        out.append({"role": "user", "content": f"Frage {i}: erzähl mir etwas über Thema {i}. " * 3})
        out.append({"role": "assistant", "content": f"Antwort {i}: Thema {i} hat eine lange Geschichte. " * 3})
    out[-1] = {"role": "assistant", "content": "FINALE ANTWORT: die wichtigste Antwort."}
    return out


def test_a_conversation_longer_than_the_limit_keeps_the_system_prompt_and_its_last_answers(tok):
    """Repro: a conversation longer than maxSeqLength kept its first tokens, so its last answer (the
    example's own response) and most others were never trained. Now its oldest exchanges are left out,
    as few as needed, and what is kept is the system prompt and the latest turns, trained as a shorter
    conversation would be."""
    convo = long_conversation()
    full = encode_chat(tok, convo, 100_000)
    enc = encode_chat(tok, convo, 512)
    assert len(full) > 512 and enc.full_length == len(full) and not enc.truncated
    assert enc.dropped > 0 and enc.dropped % 2 == 0 and len(enc) <= 512
    kept = [convo[0], *convo[1 + enc.dropped :]]
    same = encode_chat(tok, kept, 512)
    assert (same.input_ids, same.labels, same.dropped) == (enc.input_ids, enc.labels, 0)
    assert len(encode_chat(tok, [convo[0], *convo[enc.dropped - 1 :]], 100_000)) > 512  # as few left out as fit
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nDu bist Luna.<|im_end|>\n<|im_start|>user")
    a, b = _runs(enc)[-1]
    assert tok.decode(enc.input_ids[a:b]) == "FINALE ANTWORT: die wichtigste Antwort.<|im_end|>"


def test_shortening_a_long_conversation_encodes_parts_near_the_limit_only(tok, monkeypatch):
    """Repro: a conversation of 120 exchanges took about 1.5 times the encoding work of its full length to
    shorten: the search for the earliest start that fits began in its middle, encoding half the conversation
    and then a quarter. It now grows the kept part from the end, so no part encoded is much longer than the
    limit, and the result is the same."""
    from lunatrain import tokens

    convo = long_conversation(120)
    seen: list[int] = []
    real = tokens._encode

    def counting(tokenizer, messages, terminator):
        out = real(tokenizer, messages, terminator)
        seen.append(len(out[0]))
        return out

    monkeypatch.setattr(tokens, "_encode", counting)
    enc = encode_chat(tok, convo, 512)
    full = seen.pop(0)
    assert full > 12 * 512 and enc.dropped > 0 and not enc.truncated and len(enc) <= 512
    assert max(seen) <= 4 * 512, seen
    assert len(encode_chat(tok, [convo[0], *convo[enc.dropped - 1 :]], 100_000)) > 512  # as few left out as fit


def test_a_last_exchange_longer_than_the_limit_is_cut_at_its_end(tok):
    """Where even the last exchange does not fit, it is kept from its start (its question, the beginning of
    its answer) and cut at the limit."""
    convo = long_conversation(3)
    convo[-1] = {"role": "assistant", "content": "Eine sehr lange Antwort. " * 200}
    enc = encode_chat(tok, convo, 256)
    assert enc.truncated and enc.dropped == 4 and len(enc) == 256
    assert enc.input_ids == encode_chat(tok, [convo[0], *convo[5:]], 10_000).input_ids[:256]
    assert tok.decode(enc.input_ids[_runs(enc)[-1][0] :]).startswith("Eine sehr lange Antwort.")


def test_cache_hits_on_the_same_inputs_and_misses_on_changes(settings, tok):
    data = tier_data(make_records(24))
    first = tokenize_tier(settings, "curated", tok, 128, data=data)
    assert not first.cache_hit and first.path.is_file() and first.path.is_relative_to(settings.cache_dir)
    assert first.stats["train"]["count"] == len(data.train) and first.stats["val"]["count"] == len(data.val)
    assert first.path.read_bytes()[8:9] == b"{"  # a safetensors header, never a pickle
    again = tokenize_tier(settings, "curated", tok, 128, data=data)
    assert again.cache_hit and again.key == first.key
    assert [(e.input_ids, e.labels, e.hash, e.truncated) for e in again.train] == [
        (e.input_ids, e.labels, e.hash, e.truncated) for e in first.train
    ]
    assert tokenize_tier(settings, "curated", tok, 64, data=data).cache_hit is False
    tok.chat_template += "{# other template #}"
    assert tokenize_tier(settings, "curated", tok, 128, data=data).cache_hit is False


def test_a_tokenized_tier_holds_each_distinct_value_once(settings, tok):
    """Explore repro: a 50,000-conversation tier held about 72 bytes a token (an int object per id and per
    masked label beside the list slots): 1.4 GB where the memory plan said 0.9 GiB, a cache hit more than a
    miss. Fresh or from the cache, equal values are one object, so a token costs its two list slots."""
    data = tier_data(make_records(24))
    for tier in (tokenize_tier(settings, "curated", tok, 128, data=data) for _ in range(2)):  # a miss, then a hit
        values: dict[int, int] = {}
        for enc in (e for split in tier.splits.values() for e in split):
            for value in (*enc.input_ids, *enc.labels):
                assert values.setdefault(value, id(value)) == id(value), (tier.cache_hit, value)
        assert IGNORE in values and len(values) < 1000


def test_a_damaged_cache_file_is_rebuilt(settings, tok):
    data = tier_data(make_records(12))
    first = tokenize_tier(settings, "curated", tok, 128, data=data)
    first.path.write_bytes(b"garbage")
    again = tokenize_tier(settings, "curated", tok, 128, data=data)
    assert not again.cache_hit and [e.input_ids for e in again.train] == [e.input_ids for e in first.train]
    assert tokenize_tier(settings, "curated", tok, 128, data=data).cache_hit


def test_a_last_question_longer_than_the_limit_keeps_the_conversation_that_trains_more(tok):
    """Where the last exchange's question alone passes the limit, keeping that exchange would train nothing:
    the conversation is then cut at its end as a whole, and its first answers are trained."""
    convo = long_conversation(4)
    convo[-2] = {"role": "user", "content": "Lies das: " + "sehr langer Text " * 300}
    enc = encode_chat(tok, convo, 300)
    assert enc.truncated and enc.dropped == 0 and enc.n_supervised > 0 and len(enc) == 300


def test_a_template_that_refuses_a_shortened_part_gets_the_next_start_that_fits(tok):
    """A template refusing some shortened conversations (here: those that start at question 4) does not end
    the search: the earliest later start that renders and fits is kept."""
    base = tok.chat_template
    tok.chat_template = (
        "{% if messages[1]['content'].startswith('Frage 4') %}{{ raise_exception('no') }}{% endif %}" + base
    )
    convo = long_conversation()
    enc = encode_chat(tok, convo, 512)
    tok.chat_template = base
    plain = encode_chat(tok, convo, 512)
    assert plain.dropped > 0 and enc.dropped >= plain.dropped and enc.dropped < len(convo) - 3
    assert not enc.truncated and len(enc) <= 512


# Mistral v0.3's shape (written for this test): a system message goes into the last user turn only.
MISTRAL_V3_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for m in loop_messages %}{%- if m['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + m['content'] + '<|im_end|>' }}{%- endif %}{%- endfor %}"
)


def test_a_template_that_writes_the_system_message_into_the_last_user_turn_asks_where_it_trains(tok, settings):
    """Review repro: on Mistral v0.3's template prepare warned "the generation prompt ends in 'S\\n\\nU[/INST]'"
    (the probe's own text): the probe with a system message renders it into the prompt's last user turn but
    not into a conversation that ends with an answer. The generation prompt itself opens nothing new."""
    from lunatrain.tokens import generation_prompt_gap, system_dropped

    tok.chat_template = MISTRAL_V3_STYLE
    assert generation_prompt_gap(tok) is None
    # Second review repro: what the probe had seen is said on the data itself: a conversation ending with an
    # answer trains without its system message, which chat (ending with a user turn) asks with
    with_system = CONVO[:3]  # system, user, the answer
    assert system_dropped(tok, with_system) and not system_dropped(tok, CONVO[1:3])
    assert not system_dropped(models.load_tokenizer(None, settings), with_system)  # ChatML keeps it
