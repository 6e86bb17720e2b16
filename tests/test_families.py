"""Chat-template families: exactly each assistant answer plus its turn terminator is trained.

Templates are written here in the shape and with the quirks of each family (not copied from any model);
the tokenizer is luna-tiny's vocabulary with the family's special tokens added and its eos set the way the
family's tokenizer sets it. Run: `pytest tests/test_families.py -q`.
"""

from __future__ import annotations

import re

import pytest

from lunatrain import models
from lunatrain.templates import turn_terminator
from lunatrain.tokens import IGNORE, assistant_spans, encode_chat

CHATML_INSTRUCT = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_BASE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3.x: BOS written by the template, header lines, an injected knowledge-date block in the system turn.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] | trim %}{%- set rest = messages[1:] %}"
    "{%- else %}{%- set sys = '' %}{%- set rest = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nKnowledge cutoff: 2023\\n\\n' + sys + '<|eot_id|>' }}"
    "{%- for m in rest %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Gemma 2/3: no system role (folded into the first user turn), the assistant is `model`.
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set prefix = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- for m in rest %}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
# Mistral [INST]: eos written after each answer, strict user/assistant alternation, system folded into the
# last user turn.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}{%- set rest = messages[1:] %}"
    "{%- else %}{%- set sys = '' %}{%- set rest = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for m in rest %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if loop.last or loop.revindex0 == 1 %}{%- if sys %}{%- set c = sys + '\\n\\n' + m['content'] %}"
    "{%- else %}{%- set c = m['content'] %}{%- endif %}{%- else %}{%- set c = m['content'] %}{%- endif %}"
    "{{- '[INST] ' + c + ' [/INST]' }}"
    "{%- else %}{{- m['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Llama 2: <<SYS>> block inside the first [INST], BOS before and eos after every exchange.
LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set sys = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- for m in rest %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if m['role'] == 'user' %}{{- bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + m['content'] | trim + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Phi-3/4: <|end|> closes every turn; without a generation prompt the eos is appended at the very end.
PHI3 = (
    "{%- for m in messages %}{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)
ZEPHYR = (
    "{%- for m in messages %}{{- '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
# Qwen3 / DeepSeek-R1 style: ChatML; answers before the last user message lose their <think> block.
THINKING = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set c = m['content'] %}"
    "{%- if '</think>' in c %}{%- set reasoning = c.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set c = c.split('</think>')[-1].lstrip('\\n') %}{%- else %}{%- set reasoning = '' %}{%- endif %}"
    "{%- if loop.index0 > ns.last_user and reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + c + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name: (template, special tokens to add, bos, eos, expected terminator)
FAMILIES = {
    "chatml-instruct": (CHATML_INSTRUCT, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
    "chatml-base": (CHATML_BASE, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|endoftext|>", "<|im_end|>"),
    "llama-3.0": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "llama-3.1": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
    "llama-2": (LLAMA2, ["<s>", "</s>"], "<s>", "</s>", "</s>"),
    "phi-3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|endoftext|>",
              "<|end|>"),
    "zephyr": (ZEPHYR, ["<|system|>", "<|user|>", "<|assistant|>", "</s>"], None, "</s>", "</s>"),
    "thinking": (THINKING, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>", "<|im_end|>"),
}

SYSTEM = {"role": "system", "content": "Du bist Luna. Antworte kurz."}
TURNS = [
    {"role": "user", "content": "Wie viel ist 2 + 2?"},
    {"role": "assistant", "content": "<think>\nZwei und zwei.\n</think>\n\n2 + 2 = 4."},
    {"role": "user", "content": "Und auf Englisch?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "Danke dir!"},
    {"role": "assistant", "content": "<think>\nHöflich bleiben.\n</think>\n\nGern geschehen, bis bald."},
]
CONVERSATIONS = {
    "single": TURNS[:2],
    "single+system": [SYSTEM, *TURNS[:2]],
    "multi": TURNS,
    "multi+system": [SYSTEM, *TURNS],
}


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """luna-tiny's tokenizer (vocabulary trained on the bundled text), saved once for the module."""
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("vocab")
    tok = PreTrainedTokenizerFast(tokenizer_object=models._train_tokenizer(models.tiny_corpus(), 3072))
    tok.save_pretrained(str(path))
    return path


def family_tokenizer(vocab_dir, family: str):
    from transformers import AutoTokenizer

    template, specials, bos, eos, _term = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(vocab_dir))
    tok.add_special_tokens({"extra_special_tokens": specials})
    tok.eos_token = eos
    tok.bos_token = bos
    tok.chat_template = template
    return tok


def _strip_think_unless_last(messages: list[dict], family: str) -> list[str]:
    """What each assistant turn's rendered content is: thinking templates keep the reasoning only after the
    last user message; the others render the content as given (the probe contents carry no <think> there)."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = []
    for i in answers:
        content = messages[i]["content"]
        if family != "thinking" or i < last_user:
            content = content.split("</think>")[-1].strip()
        out.append(content)
    return out


def _plain(messages: list[dict], family: str) -> list[dict]:
    """Non-thinking families get plain answers (a literal <think> would be typed text for them)."""
    if family == "thinking":
        return messages
    return [{**m, "content": m["content"].split("</think>")[-1].strip()} if m["role"] == "assistant" else m
            for m in messages]


def trained_runs(tok, enc) -> list[list[int]]:
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE:
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_answer_and_its_terminator_is_trained_and_nothing_else(vocab_dir, family, conversation):
    tok = family_tokenizer(vocab_dir, family)
    expected_terminator = FAMILIES[family][4]
    term = turn_terminator(tok)
    assert term.text == expected_terminator and term.ids == (tok.convert_tokens_to_ids(expected_terminator),)
    messages = _plain(CONVERSATIONS[conversation], family)
    enc = encode_chat(tok, messages, 4096)
    runs = trained_runs(tok, enc)
    answers = _strip_think_unless_last(messages, family)
    assert len(runs) == len(answers), [tok.decode(r) for r in runs]
    for run, answer in zip(runs, answers, strict=True):
        # the whole answer plus the terminator, and nothing of system, user or headers (spacing aside:
        # [INST] templates put a space before the answer that belongs to its first token)
        assert run[-1] == term.ids[0]
        assert _squash(tok.decode(run, skip_special_tokens=False)) == _squash(answer + expected_terminator)
    # every token outside the runs stays masked: the count of trained tokens is exactly the runs' length
    assert enc.n_supervised == sum(len(r) for r in runs)


def test_the_eos_only_rule_misses_gemmas_end_of_turn(vocab_dir):
    """Control: ending turns at tokenizer.eos_token (<eos>) on the Gemma shape never trains <end_of_turn>,
    the token a Gemma model must produce to stop; the detected terminator does."""
    tok = family_tokenizer(vocab_dir, "gemma")
    messages = _plain(CONVERSATIONS["multi"], "gemma")
    eot_id = tok.convert_tokens_to_ids("<end_of_turn>")

    def trained_ids(terminator: str) -> list[list[int]]:
        text, spans = assistant_spans(tok, messages, terminator)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return [[t for t, (a, _b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if s <= a < e]
                for s, e in spans]

    eos_rule = trained_ids(tok.eos_token)
    assert all(run[-1] != eot_id for run in eos_rule) and not any(eot_id in run for run in eos_rule)
    detected = trained_ids(turn_terminator(tok).text)
    assert all(run[-1] == eot_id for run in detected)


def test_roles_that_do_not_alternate_are_refused_by_strict_templates(vocab_dir):
    tok = family_tokenizer(vocab_dir, "mistral")
    bad = [TURNS[0], TURNS[0], TURNS[3]]
    with pytest.raises(Exception, match="alternate"):
        encode_chat(tok, _plain(bad, "mistral"), 4096)
