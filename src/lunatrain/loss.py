"""The memory-lean loss: cross-entropy at the supervised positions, in chunks, without ever holding the
logits of the whole micro-batch.

The plain path (`train.forward_supervised`) projects every supervised position onto the vocabulary at
once: for a 128k vocabulary at 16k supervised tokens that is 2 billion logits, several bytes each for the
logits, their float32 copy, the softmax saved for backward and its gradient. Here the model runs without
its output layer; the final hidden states at the supervised positions are cut into chunks of
`chunk_tokens(vocab)` rows, and each chunk goes output layer → float32 → cross-entropy under
`torch.utils.checkpoint`, so only the chunk's hidden states are kept and backward recomputes its logits.
Peak memory for the loss is one chunk's logits instead of all of them; the cost is the output layer's
forward run twice.

The chunked path reproduces `lm_head` plus Gemma 2's final-logit softcapping. Architectures that change
the logits in other ways (Granite's `logits_scaling`, Cohere's `logit_scale`, …) are found by
`lean_loss_check`, which compares both paths on a few tokens once per run; they keep the plain path.
"""

from __future__ import annotations

import contextlib
from typing import Any

# Logits per chunk, in elements: 2^24 float32 values are 64 MiB (128 tokens of a 128k vocabulary, 1024 of
# a 16k one): small against the model, large enough that the output layer runs as a few big matmuls.
CHUNK_ELEMENTS = 1 << 24


def chunk_tokens(vocab: int) -> int:
    """Supervised positions per chunk for a vocabulary of `vocab` tokens (at least 64)."""
    return max(64, CHUNK_ELEMENTS // max(vocab, 1))


def causal_lm(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _parts(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder without the output layer, output layer, final-logit softcap) of a causal LM."""
    lm = causal_lm(model)
    return lm.base_model, lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)


def _autocast(device: str, dtype: Any) -> Any:
    import torch

    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _project(head: Any, hidden: Any, cap: float | None) -> Any:
    import torch

    logits = head(hidden)
    if cap is not None:  # Gemma 2: cap * tanh(logits / cap), in the model's dtype as transformers does it
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_loss(hidden: Any, targets: Any, head: Any, cap: float | None, device: str, dtype: Any) -> Any:
    import torch.nn.functional as F

    with _autocast(device, dtype):
        logits = _project(head, hidden, cap)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_loss_sum(model: Any, batch: Any, device: str, autocast_dtype: Any = None, chunk: int | None = None) -> Any:
    """Sum of cross-entropy over the batch's supervised positions (float32), chunk by chunk."""
    import torch
    from torch.utils.checkpoint import checkpoint

    decoder, head, cap = _parts(model)
    mask = batch.mask.to(device)
    with _autocast(device, autocast_dtype):
        hidden = decoder(**batch.model_inputs(device), use_cache=False).last_hidden_state
    hidden, targets = hidden[mask], batch.targets.to(device)[mask]
    size = chunk or chunk_tokens(head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    # one chunk: its logits are made right before backward needs them, so keeping them costs nothing extra
    # and recomputing them would only cost time
    recompute = torch.is_grad_enabled() and hidden.shape[0] > size
    for h, t in zip(hidden.split(size), targets.split(size), strict=True):
        if recompute:  # backward recomputes this chunk's logits instead of keeping them
            total = total + checkpoint(_chunk_loss, h, t, head, cap, device, autocast_dtype, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, t, head, cap, device, autocast_dtype)
    return total


def lean_loss_check(model: Any, device: str) -> str | None:
    """None when the chunked path gives this model's own logits; else why not (the run keeps the plain path).

    Runs both on 8 tokens with dropout off: an architecture that scales or caps its logits in a way the
    chunked path does not know shows up as a difference here, before any training step."""
    import torch

    lm = causal_lm(model)
    try:
        decoder, head, cap = _parts(model)
    except (AttributeError, NotImplementedError):
        return "the model has no separate output layer"
    if decoder is lm or head is None:
        return "the model has no separate output layer"
    vocab = head.weight.shape[0]
    ids = (torch.arange(8, device=device) * 7919 % vocab).unsqueeze(0)
    pos = torch.arange(8, device=device).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            lean = _project(head, hidden, cap).float()
    except Exception as exc:  # an architecture whose decoder cannot be called on its own
        return f"the decoder cannot run without its output layer ({type(exc).__name__})"
    finally:
        model.train(was_training)
    if full.shape != lean.shape:
        return "the output layer's shape differs from the model's logits"
    if float((full - lean).abs().max()) > 1e-3 * float(full.abs().max()) + 1e-6:
        return f"{type(lm).__name__} computes its logits differently (scaled or capped)"
    return None
