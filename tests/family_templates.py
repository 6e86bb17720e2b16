"""Chat templates in the shape of each model family (written for these tests, not copied from any model),
and tiny random-weight models of each architecture carrying them. Used by test_families.py (masking) and
test_architectures.py (train, gate, merge).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

# Gemma 2 as its instruction-tuned models ship it: a system turn is refused, not folded (Gemma 3 folds it).
GEMMA2_STRICT = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# name: (template, special tokens to add, bos, eos, expected terminator)
FAMILIES = {
    "chatml-instruct": (CHATML_INSTRUCT, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
    "chatml-base": (CHATML_BASE, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|endoftext|>", "<|im_end|>"),
    "llama-3.0": (
        LLAMA3,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
    ),
    "llama-3.1": (
        LLAMA3,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|eot_id|>",
    ),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
    "llama-2": (LLAMA2, ["<s>", "</s>"], "<s>", "</s>", "</s>"),
    "phi-3": (
        PHI3,
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        None,
        "<|endoftext|>",
        "<|end|>",
    ),
    "zephyr": (ZEPHYR, ["<|system|>", "<|user|>", "<|assistant|>", "</s>"], None, "</s>", "</s>"),
    "thinking": (THINKING, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>", "<|im_end|>"),
}


# Families whose template refuses a conversation shape the others take (kept out of FAMILIES, whose tests
# render a system turn on every family).
REFUSING = {
    "gemma-2-strict": (
        GEMMA2_STRICT,
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
    ),
}


def family_tokenizer(vocab_dir: Path, family: str):
    """luna-tiny's vocabulary (saved in `vocab_dir`) with the family's special tokens, eos, bos and template."""
    from transformers import AutoTokenizer

    template, specials, bos, eos, _term = (FAMILIES | REFUSING)[family]
    tok = AutoTokenizer.from_pretrained(str(vocab_dir))
    tok.add_special_tokens({"extra_special_tokens": specials})
    tok.eos_token = eos
    tok.bos_token = bos
    tok.chat_template = template
    return tok


def save_vocab(path: Path) -> Path:
    """luna-tiny's tokenizer (its vocabulary trained on the bundled text), saved as a HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from lunatrain import models

    tok = PreTrainedTokenizerFast(tokenizer_object=models._train_tokenizer(models.tiny_corpus(), 3072))
    tok.save_pretrained(str(path))
    return path


# architecture: (config class name, family template, extra config)
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "chatml-base", {}),
    "llama": ("LlamaConfig", "llama-3.0", {}),
    "gemma2": (
        "Gemma2Config",
        "gemma",
        {
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
        },
    ),
    "gemma3": ("Gemma3TextConfig", "gemma", {"query_pre_attn_scalar": 16, "sliding_window": 8}),
    "mistral": ("MistralConfig", "mistral", {"sliding_window": 8}),
    "phi3": ("Phi3Config", "phi-3", {}),
}

# Mixtures of experts (kept out of ARCHITECTURES, whose tests train with the profile's dropout: LoRA on fused
# experts takes none). transformers 5 keeps each layer's experts as fused 3-D parameters, not linear layers.
MIXTURES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "chatml-instruct",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1},
    ),
    "mixtral": ("MixtralConfig", "mistral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    # Llama 4's text model: a router that is a linear layer returning (scores, experts), experts PEFT leaves alone
    "llama4": (
        "Llama4TextConfig",
        "llama-3.1",
        {"intermediate_size_mlp": 64, "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1},
    ),
}
# The mixtures whose experts PEFT's all-linear wraps (fused expert parameters, `target_parameters`).
EXPERTS_WRAPPED = ("qwen3_moe", "mixtral")


def tiny_config(cls_name: str, **fields: Any) -> Any:
    """A 2-layer, hidden-32 config of the transformers class `cls_name`, `fields` over those sizes."""
    import transformers

    sizes = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    sizes |= {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512}
    return getattr(transformers, cls_name)(**(sizes | fields))


def build_arch_model(path: Path, vocab_dir: Path, arch: str, *, seed: int = 0, family: str | None = None) -> Path:
    """A 2-layer, hidden-32 random-weight model of `arch` with its family's tokenizer and template (or those
    of `family`), saved in HF format (safetensors) with a generation_config whose eos is the tokenizer's eos."""
    from transformers import AutoModelForCausalLM

    cls_name, own, extra = (ARCHITECTURES | MIXTURES)[arch]
    family = family or own
    tok = family_tokenizer(vocab_dir, family)
    vocab = -(-len(tok) // 64) * 64
    config = tiny_config(
        cls_name,
        vocab_size=vocab,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id or 0,
        **extra,
    )
    return _saved(path, tok, lambda: AutoModelForCausalLM.from_config(config), seed)


def _saved(path: Path, tok: Any, build: Callable[[], Any], seed: int) -> Path:
    """The model `build` makes (random weights drawn from `seed`), saved in HF format (safetensors) with `tok`
    (padding with its eos where it has no pad) and a generation_config whose eos is the tokenizer's."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build().float()
    model.save_pretrained(str(path), safe_serialization=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id}), "utf-8")
    return path


def build_gemma3_multimodal(path: Path, vocab_dir: Path, *, seed: int = 0) -> Path:
    """A google/gemma-3-*-it folder's shape: Gemma3ForConditionalGeneration, a 2-layer Gemma 3 language model
    beside a 1-layer SigLIP vision tower, Gemma's tokenizer with its image markers."""
    import transformers

    tok = family_tokenizer(vocab_dir, "gemma")
    tok.add_special_tokens({"extra_special_tokens": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]})
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id or 0}
    text = tiny_config(
        "Gemma3TextConfig", vocab_size=-(-len(tok) // 64) * 64, query_pre_attn_scalar=16, sliding_window=8, **ids
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=1,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        **ids,
    )
    return _saved(path, tok, lambda: transformers.Gemma3ForConditionalGeneration(config), seed)
