"""The training speed paths keep the math: per-sample attention on a flat row gives the logits and gradients
of running each sample alone, and the 16-bit LoRA dropout is a dropout (rate, expectation, gradient,
reproducibility)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lunatrain import compat, kernels, models
from lunatrain.tokens import encode_chat, make_batch, shifted_targets
from lunatrain.train import forward_supervised

from helpers import make_records


def _samples(tok, n=5):
    return [encode_chat(tok, r["messages"], 128) for r in make_records(n, multi_turn_every=2)]


def _lora(model, dropout=0.0):
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():  # non-zero B so the adapter changes the logits
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return peft_model


def _random_model(config_cls, **over):
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **over,
    )
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(cfg).eval()


def test_flat_batch_layout(settings):
    tok = models.load_tokenizer(None, settings)
    samples = _samples(tok, 4)
    batch = make_batch(samples, 64, tok.pad_token_id, flat=True)
    lengths = [len(s) for s in samples]
    assert batch.input_ids.shape == (1, sum(lengths))  # one row, no padding
    assert batch.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch.max_length == max(lengths)
    for s, (row, a, b) in zip(samples, batch.segments, strict=True):
        assert row == 0 and batch.input_ids[0, a:b].tolist() == s.input_ids
        assert batch.position_ids[0, a:b].tolist() == list(range(len(s)))
        assert batch.targets[0, a:b].tolist() == shifted_targets(s)
    rows = make_batch(samples, 64, tok.pad_token_id)
    assert (batch.n_tokens, batch.n_supervised) == (rows.n_tokens, rows.n_supervised)
    assert rows.cu_seqlens is None


def test_install_on_luna_tiny(settings):
    model = _lora(models.load_model(None, settings), dropout=0.05)
    assert kernels.install(model, "cpu") == {"attention": "varlen-sdpa", "dropout": "fast16"}
    assert kernels.uses_varlen(model)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(type(d) is kernels.fast_dropout_class() and d.p == 0.05 for d in drops)


def test_install_keeps_sdpa_where_unsupported(settings, monkeypatch):
    monkeypatch.setattr(kernels, "varlen_supported", lambda _m: False)
    model = _lora(models.load_model(None, settings))  # dropout 0: nothing to swap either
    assert kernels.install(model, "cpu") == {"attention": "sdpa-block-mask", "dropout": "torch"}
    assert not kernels.uses_varlen(model)


def test_varlen_logits_and_gradients_equal_one_by_one(settings):
    """Forward and backward of a flat row through per-sample attention (GQA: luna-tiny has fewer kv heads)
    equal running each sample alone with the model's own SDPA attention."""
    tok = models.load_tokenizer(None, settings)
    samples = _samples(tok)
    model = _lora(models.load_model(None, settings))
    lora = [p for p in model.parameters() if p.requires_grad]

    solo_loss = 0.0
    solo_logits = []
    for s in samples:
        batch = make_batch([s], 128, tok.pad_token_id)
        logits, targets = forward_supervised(model, batch, "cpu")
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        loss.backward()
        solo_loss += loss.item()
        solo_logits.append(logits.detach())
    solo_grads = [p.grad.clone() for p in lora]
    model.zero_grad(set_to_none=True)

    kernels.install(model, "cpu")
    flat = make_batch(samples, 128, tok.pad_token_id, flat=True)
    logits, targets = forward_supervised(model, flat, "cpu")
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    torch.testing.assert_close(logits.detach(), torch.cat(solo_logits), atol=1e-4, rtol=1e-4)
    assert abs(loss.item() - solo_loss) / flat.n_supervised < 1e-4
    for p, g in zip(lora, solo_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "mistral-window", "qwen2"])
def test_varlen_matches_unpacked_on_other_architectures(arch):
    """Random small models of other families, including a sliding window shorter than the samples."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    model = {
        "llama": lambda: _random_model(LlamaConfig),
        "mistral-window": lambda: _random_model(MistralConfig, sliding_window=8),
        "qwen2": lambda: _random_model(Qwen2Config),
    }[arch]()
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 23, 1, 17]
    seqs = [torch.randint(3, 512, (n,), generator=gen) for n in lengths]
    with torch.no_grad():
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in seqs]
        assert kernels.install(model, "cpu")["attention"] == "varlen-sdpa"
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        packed = model(
            input_ids=torch.cat(seqs)[None],
            position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(lengths),
            max_length_k=max(lengths),
        ).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_without_boundaries_a_row_is_one_causal_sequence():
    from transformers import LlamaConfig

    model = _random_model(LlamaConfig)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        kernels.install(model, "cpu")
        out = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_wrong_boundary_changes_the_result():
    """Control for the tests above: boundaries are really used (two samples joined into one differ)."""
    from transformers import LlamaConfig

    model = _random_model(LlamaConfig)
    kernels.install(model, "cpu")
    ids = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]

    def run(cu):
        cu = torch.tensor(cu, dtype=torch.int32)
        return model(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits

    with torch.no_grad():
        assert (run([0, 8, 20]) - run([0, 20]))[0, 8:].abs().max() > 1e-3


# --- dropout --------------------------------------------------------------------------------------


def test_fast_dropout_rate_expectation_and_gradient():
    drop = kernels.fast_dropout_class()(0.05).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    p_real = round(0.05 * 65536) / 65536
    assert abs(rate - p_real) < 4 * (p_real * (1 - p_real) / x.numel()) ** 0.5  # within 4 standard errors
    scale = 1 / (1 - p_real)
    assert torch.all(y[kept] == scale)  # kept values scaled by the realized keep probability
    assert abs(y.mean().item() - 1.0) < 2e-3
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * scale)
    # same seed, same mask; another seed, another one
    torch.manual_seed(0)
    assert torch.equal(drop(x.detach()), y.detach())
    torch.manual_seed(1)
    assert not torch.equal(drop(x.detach()), y.detach())


def test_fast_dropout_eval_and_odd_shapes():
    torch.manual_seed(0)  # the same draws whichever tests ran before on this worker
    drop = kernels.fast_dropout_class()(0.3)
    x = torch.randn(3, 7, 5)  # 105 elements: not a multiple of four draws per word
    assert drop.eval()(x) is x
    out = drop.train()(x)
    assert out.shape == x.shape and 0 < int((out == 0).sum()) < x.numel()
    assert kernels.fast_dropout_class()(0.0).train()(x) is x


def test_a_dropout_the_16_bit_draws_cannot_tell_from_1_keeps_torchs_own(settings):
    """Explore repro: `--dropout 0.999995` (valid: below 1) ended every CPU run in "ZeroDivisionError":
    16-bit draws round it to 1, and the kept values' scale divided by zero. Such a layer keeps torch's own
    dropout; every other rate is swapped."""
    for p, swapped in ((0.999995, False), (0.99999, True), (0.1, True)):
        model = get_peft_model(
            models.load_model(None, settings), LoraConfig(r=2, lora_dropout=p, target_modules=["q_proj"])
        )
        assert kernels.swap_dropout(model) is swapped, p
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(type(d) is torch.nn.Dropout for d in drops) is not swapped
        out = drops[0].train()(torch.ones(64, 64))
        assert torch.isfinite(out).all(), p


# --- CUDA varlen kernel: how the call adapts to the torch release (checked with stand-in kernels) ------


def _reference(q, k, v, lengths):
    """Per-sample causal attention in the kernel's layout: [T, H, D]."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
    parts = [
        torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)
        for a, b, c in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)
    ]
    return torch.cat(parts, dim=1).transpose(0, 1)


def _old_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10/2.11 shape of varlen_attn: is_causal, no scale, no GQA."""
    assert is_causal and query.shape[1] == key.shape[1] and query.dtype == key.dtype
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    return _reference(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), lengths)


def _new_kernel(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """torch 2.13 shape: causality as window (-1, 0), scale and enable_gqa keywords."""
    assert tuple(window_size) == (-1, 0) and enable_gqa == (query.shape[1] != key.shape[1])
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    return _reference(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), lengths)


@pytest.mark.parametrize("kernel", [_old_kernel, _new_kernel])
def test_flash_varlen_call_fits_each_torch_signature(kernel, monkeypatch):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    compat.varlen_attn_signature.cache_clear()
    try:
        gen = torch.Generator().manual_seed(4)
        q = torch.randn(1, 4, 20, 16, generator=gen)
        k, v = torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen)  # GQA
        cu = torch.tensor([0, 8, 20], dtype=torch.int32)
        out = kernels._flash_varlen(q, k, v, cu, 12, 16**-0.5)
        torch.testing.assert_close(out, _reference(q[0], k[0], v[0], [8, 12]))
        if kernel is _old_kernel:  # no `scale` keyword: a non-default scale cannot be expressed
            assert kernels._flash_varlen(q, k, v, cu, 12, 0.5) is None
    finally:
        compat.varlen_attn_signature.cache_clear()
