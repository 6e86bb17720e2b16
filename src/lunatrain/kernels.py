"""Speed paths for the training loop that keep its math: per-sample attention for packed batches and a
cheaper LoRA dropout on CPU. `install(model, device)` puts them in place where the model allows and says
what it chose; the training report records that choice.

Per-sample ("varlen") attention. A packed micro-batch is one flat row: every sample's tokens back to back,
no padding, position ids restarting per sample, and `cu_seq_lens` (cumulative sample lengths) passed to
the model. The attention function registered here runs causal attention inside each sample only: the
linear layers see exactly the real tokens, and attention costs the sum of squared sample lengths instead
of a dense block mask over the whole row (which SDPA computes in full and then masks). transformers builds
no mask for a registered attention function it has no mask builder for, so nothing quadratic in the row
length is ever allocated. On CUDA `torch.nn.attention.varlen.varlen_attn` does the same in one kernel
when it passes a self-check against the per-sample path; otherwise each sample gets its own SDPA call.

LoRA dropout on CPU. PEFT's `nn.Dropout` draws one float per input element through `bernoulli_`, which on
CPU costs more than the LoRA matmul it feeds (17% of a step on the benchmark model). `FastDropout` draws
16 random bits per element, four elements per 64-bit draw: the drop probability is `p` rounded to a
multiple of 1/65536 (0.05 → 0.050003), and kept values are scaled by the realized keep probability, so
the expectation is exactly the input. Same seed, same masks: runs stay byte-reproducible.
"""

from __future__ import annotations

import functools
from typing import Any

from . import compat
from .loss import causal_lm

ATTENTION = "lunatrain_varlen"
_BITS = 16
_LEVELS = 1 << _BITS

# Attention variants the per-sample function does not reproduce; models using them keep their own path.
_UNSUPPORTED_ATTRS = ("attn_logit_softcapping", "sinks", "logit_cap")


def install(model: Any, device: str) -> dict[str, str]:
    """Switch a PEFT model to per-sample attention (when its architecture allows) and, on CPU, to the
    cheaper LoRA dropout. Returns {"attention": ..., "dropout": ...} naming what is in use."""
    chosen = {"attention": "sdpa-block-mask", "dropout": "torch"}
    base = causal_lm(model)
    if varlen_supported(base):
        register()
        try:
            base.set_attn_implementation(ATTENTION)
            chosen["attention"] = "varlen-flash" if device == "cuda" and flash_varlen_ok() else "varlen-sdpa"
        except (ValueError, TypeError, NotImplementedError):
            pass  # an architecture that cannot switch backends keeps SDPA with its block mask
    if device == "cpu" and swap_dropout(model):
        chosen["dropout"] = f"fast{_BITS}"
    return chosen


def uses_varlen(model: Any) -> bool:
    """Whether `model` runs the per-sample attention (so batches should be laid out as one flat row)."""
    base = causal_lm(model)
    return compat.attn_implementation(base) == ATTENTION


def varlen_supported(model: Any) -> bool:
    if not compat.supports_attention_backend(model):
        return False
    for module in model.modules():
        if any(getattr(module, attr, None) is not None for attr in _UNSUPPORTED_ATTRS):
            return False
    return True


@functools.cache
def register() -> None:
    compat.register_attention(ATTENTION, varlen_attention)


# --- attention ------------------------------------------------------------------------------------


def varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention interface: query [1, H, T, D], key/value [1, Hkv, T, D] → [1, T, H, D].

    Samples are given by `cu_seq_lens_q` ([0, len0, len0+len1, …]). A call without it (an unpacked batch)
    treats each row as one causal sequence."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))  # keys i-window+1 .. i
    if cu is None:
        out = _sdpa_causal(query, key, value, scaling, dropout, window)
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError("per-sample attention expects one flat row per batch")
    if query.is_cuda and window is None and dropout == 0.0 and flash_varlen_ok():
        max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        out = _flash_varlen(query, key, value, cu, max_len, scaling)
        if out is not None:
            return out.unsqueeze(0), None
    # kv heads repeated once for the whole row, not once per sample; split (not slicing): its backward is
    # one concatenation, where each slice's backward would write a full-length zero gradient per sample
    key, value = _expand_kv(query, key, value)
    lengths = (cu[1:] - cu[:-1]).tolist()
    parts = [
        _sdpa_causal(q, k, v, scaling, dropout, window).transpose(1, 2)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(parts, dim=1), None


def _expand_kv(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """Grouped-query attention: kv heads repeated to the query heads ([B, H, T, D]); works on every SDPA
    backend, where `enable_gqa` does not."""
    if k.shape[1] == q.shape[1]:
        return k, v
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _sdpa_causal(q: Any, k: Any, v: Any, scale: float | None, dropout: float, window: int | None) -> Any:
    import torch
    import torch.nn.functional as F

    k, v = _expand_kv(q, k, v)
    length = q.shape[2]
    if window is not None and length > window:  # sliding window: causal band of `window` keys
        band = torch.ones(length, length, dtype=torch.bool, device=q.device).tril().triu(-(window - 1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)


def _flash_varlen(q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float | None) -> Any:
    """torch's variable-length flash attention: [T, H, D] in, [T, H, D] out; None when this torch's
    signature cannot express the call (compat.varlen_attn_kwargs)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    q3, k3, v3 = (t[0].transpose(0, 1) for t in (q, k, v))
    gqa = k3.shape[1] != q3.shape[1]
    extra = compat.varlen_attn_kwargs(scale, q.shape[-1], gqa)
    if extra is None:
        return None
    if gqa and not compat.varlen_takes_gqa():
        k3, v3 = _expand_kv(q3, k3, v3)  # heads are dim 1 in [T, H, D] as in [B, H, T, D]
    cu = cu.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q3, k3, v3, cu, cu, max_len, max_len, **extra)


@functools.cache
def flash_varlen_ok() -> bool:
    """Whether torch's varlen kernel exists here and agrees with the per-sample SDPA path (forward and
    backward run, outputs within bf16 tolerance) on a small two-sample batch. Checked once per process."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, 4, 48, 64, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
            for _ in range(3)
        )
        cu = torch.tensor([0, 20, 48], device="cuda", dtype=torch.int32)
        fast = _flash_varlen(q, k, v, cu, 28, None)
        if fast is None:
            return False
        fast.float().sum().backward()
        ref = torch.cat(
            [_sdpa_causal(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, 0.0, None) for s, e in ((0, 20), (20, 48))],
            dim=2,
        )[0].transpose(0, 1)
        return bool(torch.allclose(fast.float(), ref.float(), atol=2e-2, rtol=2e-2))
    except Exception:  # no kernel for this GPU/dtype, or a signature this code does not know
        return False


# --- LoRA dropout ---------------------------------------------------------------------------------


@functools.cache
def fast_dropout_class() -> type:
    import torch
    from torch import nn

    class FastDropout(nn.Dropout):
        """nn.Dropout with 16-bit random draws (see the module docstring); identity in eval mode."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            threshold = round(self.p * _LEVELS)
            if not self.training or threshold == 0:
                return x
            n = x.numel()
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
            draws = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
            keep = draws >= threshold - _LEVELS // 2
            return torch.where(keep, x, 0.0) * (_LEVELS / (_LEVELS - threshold))

    return FastDropout


def swap_dropout(model: Any) -> bool:
    """Replace every LoRA layer's nn.Dropout with FastDropout of the same p; True if any was replaced. A rate
    its 16-bit draws round to 1 (above 1 - 2**-17) keeps torch's own: FastDropout would divide by zero."""
    from torch import nn

    cls = fast_dropout_class()
    swapped = False
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is nn.Dropout and drop.p > 0 and round(drop.p * _LEVELS) < _LEVELS:
                drops[name] = cls(drop.p)
                swapped = True
    return swapped
