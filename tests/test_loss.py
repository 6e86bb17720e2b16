"""The chunked loss equals the plain one, in value and in LoRA gradients, and never keeps the logits of the
whole batch for backward. Run: `pytest tests/test_loss.py -q`."""

from __future__ import annotations

import pytest
import torch

from lunatrain import loss, models
from lunatrain.tokens import encode_chat, make_batch
from lunatrain.train import forward_supervised

from helpers import make_records


def _tiny(kind: str):
    """In-memory causal LMs (float32, random weights) that share luna-tiny's 3072-token vocabulary."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    common = {
        "vocab_size": 3072,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    torch.manual_seed(0)
    if kind == "untied":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).float()
    if kind == "gemma2-softcap":
        config = Gemma2Config(
            **common, head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=None, query_pre_attn_scalar=16
        )
        return Gemma2ForCausalLM(config).float()
    if kind == "granite-scaled":
        return GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0)).float()
    raise ValueError(kind)


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so every LoRA matrix gets a non-zero gradient
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, config)


def _batch(settings, flat=False):
    tok = models.load_tokenizer(None, settings)
    samples = [encode_chat(tok, r["messages"], 128) for r in make_records(6, multi_turn_every=2)]
    return make_batch(samples, 1024, tok.pad_token_id, flat=flat)


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    value = fn()
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return value.detach(), grads


def _plain(model, batch):
    logits, targets = forward_supervised(model, batch, "cpu")
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


@pytest.mark.parametrize("kind", ["luna-tiny", "untied", "gemma2-softcap"])
def test_chunked_loss_and_lora_gradients_equal_the_plain_path(settings, kind):
    base = models.load_model(None, settings) if kind == "luna-tiny" else _tiny(kind)
    # the untied model trains a LoRA on its output layer too: gradients must flow through each chunk
    model = _lora(base, ["q_proj", "v_proj", "down_proj", "lm_head"] if kind == "untied" else "all-linear").train()
    # float64: both paths sum the same terms in a different order (chunks; the CPU's matmul kernels), and in
    # float32 the gradients (up to ~100 here) would differ by that rounding alone, by more or less on each CPU.
    # In float64 what is left is the arithmetic itself (the cross-entropy still runs in float32 in both paths).
    model.double()
    assert loss.lean_loss_check(model, "cpu") is None
    batch = _batch(settings)
    plain, plain_grads = _loss_and_grads(model, lambda: _plain(model, batch))
    # 7 positions per chunk: many chunks, the last one short
    chunked, chunked_grads = _loss_and_grads(model, lambda: loss.chunked_loss_sum(model, batch, "cpu", chunk=7))
    assert batch.n_supervised > 7 * 4
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) >= 8
    if kind == "untied":
        assert any("lm_head" in n for n in plain_grads)
    for name, g in plain_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_softcapping_matters_so_the_gemma_case_tests_something(settings):
    """The control for the Gemma 2 case: without the cap the chunked loss would differ."""
    model = _lora(_tiny("gemma2-softcap"), "all-linear").eval()
    batch = _batch(settings)
    with torch.no_grad():
        plain = _plain(model, batch)
        model.get_base_model().config.final_logit_softcapping = None
        uncapped = loss.chunked_loss_sum(model, batch, "cpu")
    assert (plain - uncapped).abs() > 1e-2


def test_an_unknown_logit_scaling_keeps_the_plain_path(settings):
    """Granite divides its logits by `logits_scaling`, which the chunked path does not do: the check finds
    the difference and the run keeps the plain path (whose loss is then the model's own)."""
    model = _lora(_tiny("granite-scaled"), "all-linear")
    reason = loss.lean_loss_check(model, "cpu")
    assert reason and "GraniteForCausalLM" in reason
    assert model.training  # the check restores the training mode


def test_the_chunked_path_never_keeps_the_whole_logits_for_backward(settings):
    """What autograd saves for backward: the plain path keeps a [supervised, vocab] tensor, the chunked path
    keeps nothing of that size (each chunk's logits are recomputed in backward). The flat layout of the
    training loop, so that no attention mask (quadratic in the row) is among the saved tensors."""
    from lunatrain import kernels

    model = _lora(models.load_model(None, settings), "all-linear").train()
    kernels.install(model, "cpu")
    batch = _batch(settings, flat=True)
    vocab = model.get_output_embeddings().weight.shape[0]

    def largest_logits_saved(fn):  # elements of the largest saved tensor with a vocabulary-sized last dim
        sizes = [0]

        def pack(t):
            if t.dim() and t.shape[-1] == vocab:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().backward()
        return max(sizes)

    assert batch.n_supervised > 64
    assert largest_logits_saved(lambda: _plain(model, batch)) >= batch.n_supervised * vocab
    assert largest_logits_saved(lambda: loss.chunked_loss_sum(model, batch, "cpu", chunk=16)) == 0


def test_flat_batches_with_per_sample_attention_give_the_same_loss(settings):
    """The training loop's own layout (one flat row + sample boundaries) through both paths."""
    from lunatrain import kernels

    model = _lora(models.load_model(None, settings), "all-linear").eval()
    kernels.install(model, "cpu")
    batch = _batch(settings, flat=True)
    assert batch.cu_seqlens is not None
    with torch.no_grad():
        torch.testing.assert_close(
            loss.chunked_loss_sum(model, batch, "cpu", chunk=9), _plain(model, batch), rtol=1e-5, atol=1e-5
        )
