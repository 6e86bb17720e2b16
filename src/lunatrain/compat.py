"""Every check that depends on a torch, transformers, PEFT (or typer, uvicorn) release, in one place.

Each entry says which releases it serves and when it can go. Nothing else in lunatrain reads a private
attribute of these libraries, probes their signatures or silences their warnings; tested ranges are pinned
in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

# --- transformers --------------------------------------------------------------------------------

# Held while a thread imports transformers (or the training stack with it) for the first time.
IMPORTING = threading.RLock()
_transformers_imported = False


def import_transformers() -> None:
    """`import transformers` by one thread at a time. Its first import from several threads at once (the API
    answers requests in a thread pool: two prepares, a prepare beside a chat) fails in all but one with
    "cannot import name 'AutoTokenizer' from 'transformers'" (transformers 5.x puts its lazy module in place
    while it initialises); once imported, its names resolve safely from any thread. Called before every
    `from transformers import …` that a request can reach. Goes when transformers' first import is
    thread-safe."""
    global _transformers_imported
    if _transformers_imported:
        return
    with IMPORTING:
        import transformers  # noqa: F401

        _transformers_imported = True


def supports_attention_backend(model: Any) -> bool:
    """Whether the architecture routes attention through transformers' AttentionInterface (so a registered
    function can replace it). transformers 5.x exposes this only as the private class flag
    `_supports_attention_backend`; goes when a public capability query exists."""
    return bool(getattr(model, "_supports_attention_backend", False))


def attn_implementation(model: Any) -> str | None:
    """The attention implementation a model runs (transformers 5.x keeps it in `config._attn_implementation`;
    `set_attn_implementation` is the public setter, there is no public getter yet). Goes when a public getter
    exists."""
    return getattr(model.config, "_attn_implementation", None)


def register_attention(name: str, fn: Any) -> None:
    """Register an attention function under `name` (transformers >= 4.48: a process-wide registry, so
    registering is global to the process; `kernels.py` registers each name once). Stays while that registry
    is how an attention backend is plugged in."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)


@functools.cache
def masked_logits_supported() -> bool:
    """Whether this transformers release takes a boolean mask as `logits_to_keep` (newer 5.x releases have
    `modeling_utils.slice_logits_to_keep`); older ones index hidden states as [:, keep, :], which fails for a
    2-D mask, so they get every position and the mask is applied to the logits instead. Goes once the
    minimum transformers release in pyproject.toml has it."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing per decoder layer (works with frozen embeddings and replays
    dropout's RNG). Later transformers 5.x releases renamed `gradient_checkpointing_enable` to
    `activation_checkpointing_enable`; the fallback goes when the minimum release has the new name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def generation_cache_argument(model: Any) -> str:
    """The keyword a causal LM's `forward` takes its KV cache by: `cache` (later transformers 5.x releases
    renamed it) or `past_key_values` (5.0 and the earlier 5.x releases). Goes when the minimum transformers
    release in pyproject.toml has `cache`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


# --- torch ---------------------------------------------------------------------------------------


@functools.cache
def varlen_attn_signature() -> frozenset[str]:
    """Parameter names of `torch.nn.attention.varlen.varlen_attn` (new in torch 2.10; its keywords changed
    between releases); empty where it does not exist."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_attn_kwargs(scale: float | None, head_dim: int, gqa: bool) -> dict[str, Any] | None:
    """Keyword arguments for a causal `varlen_attn` call on this torch, or None when this release cannot
    express it (a non-default scale before `scale` existed). Returns {"enable_gqa": True} only where the
    kernel takes grouped kv heads itself; the caller repeats them otherwise (see `varlen_takes_gqa`).

    torch 2.10-2.11 take `is_causal`; later releases express causality as a window (left, right) = (-1, 0).
    Goes when the minimum torch release is one signature."""
    sig = varlen_attn_signature()
    extra: dict[str, Any] = {}
    if "scale" in sig:
        extra["scale"] = scale
    elif scale is not None and abs(scale - head_dim**-0.5) > 1e-9:
        return None
    if gqa and "enable_gqa" in sig:
        extra["enable_gqa"] = True
    if "is_causal" in sig:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)
    return extra


def varlen_takes_gqa() -> bool:
    """Whether `varlen_attn` takes grouped kv heads itself (`enable_gqa`, newer torch releases); else the
    caller repeats them. Goes with `varlen_attn_kwargs`, when the minimum torch release is one signature."""
    return "enable_gqa" in varlen_attn_signature()


def quiet_too_long_warning(tokenizer: Any) -> None:
    """transformers (5.x) warns once per tokenizer when it encodes more tokens than the model's
    `model_max_length` ("Running this sequence through the model will result in indexing errors"). lunatrain
    encodes whole samples on purpose and shortens them to maxSeqLength itself (prepare's `truncated` check names
    them; serving checks the context), so the line is noise in prepare's and the trainer's output. Marking it
    as already said is the tokenizer's own switch for that (its `deprecation_warnings` dict). Goes when
    transformers drops the warning or gives it a public switch."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True


# --- bitsandbytes --------------------------------------------------------------------------------


def quiet_bitsandbytes() -> None:
    """PEFT imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 bitsandbytes (0.50) then
    logs that an optional kernel package is missing (it falls back to its own kernel). Without this, that line
    would open every command's output and every trainer log. And in 8 bits on CPU it logs, on every matmul,
    that inputs are cast to float16: noise in a training log. Each goes when bitsandbytes stops logging it."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def without_bitsandbytes() -> None:
    """For a process that will not quantize (called where it starts). PEFT (0.21) imports bitsandbytes when
    it is installed, and bitsandbytes (0.50) imports torch's inductor compiler with it: about 2.3 s of CPU
    on a 2-core machine, a quarter of what starting a job costs. A None entry in `sys.modules` makes
    `importlib.util.find_spec` answer "not installed", which is how PEFT and transformers both check, so
    neither imports it. No effect once PEFT or bitsandbytes is imported. Goes when bitsandbytes imports its
    compiler lazily."""
    if "peft" not in sys.modules and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


def with_bitsandbytes() -> None:
    """Before a process that started `without_bitsandbytes()` quantizes after all. PEFT decides once, when it
    is imported, whether bitsandbytes exists: after that the process cannot quantize, and says so."""
    if "bitsandbytes" not in sys.modules or sys.modules["bitsandbytes"] is not None:
        return
    if "peft" in sys.modules:
        raise RuntimeError("this process loaded PEFT without bitsandbytes; quantized training needs a new process")
    del sys.modules["bitsandbytes"]


def keep_4bit_gradients(model: Any) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer for its AVX512-BF16 CPU kernel the first time the layer runs
    in eval mode without gradients, for good, and that kernel has no backward: after the base validation loss
    every later training step would lose the gradients through the quantized layers. So that path is
    switched off on every layer that has it (its public flag `support_avx512bf16_for_cpu`). Goes when the
    kernel has a backward, or the repacking is undone for training."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# --- building models ------------------------------------------------------------------------------

_BUILDING = threading.RLock()


@contextlib.contextmanager
def building_model() -> Iterator[None]:
    """Around every model transformers or PEFT builds in this process: `from_pretrained`, `from_config`,
    `get_peft_model`, `PeftModel.from_pretrained`, `load_adapter`.

    transformers (5.24) replaces process-wide functions while it builds a model (the `torch.nn.init`
    functions, `torch.linspace`, the default device) and puts them back after. Two builds at once in one
    process (a first chat request beside an eval gate in `serve`, two runs in a notebook's threads) put back
    each other's replacements, which then stay: every later load of that process fails with "Cannot copy out
    of meta tensor". PEFT's new LoRA layers would also draw their initial weights under another build's no-op
    init. So builds take turns. And they build at torch's float32 default: a caller's `torch.set_default_dtype`
    would otherwise change the LoRA weights PEFT creates, and so the run, with nothing in its report saying so.
    Goes when transformers builds without replacing process-wide functions (the dtype pin stays)."""
    import torch

    with _BUILDING:
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(before)


# --- PEFT ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around `get_peft_model` / `PeftModel.from_pretrained` / `load_adapter`.

    PEFT (0.21, with transformers 5.24) asks the model `is_gradient_checkpointing`, which transformers 5.x deprecates for v6
    with a FutureWarning on every call: noise for the user, nothing they can act on. Remove this when PEFT
    asks `is_activation_checkpointing` instead.
    """
    with building_model(), warnings.catch_warnings():  # a model PEFT builds takes its turn too
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        # PEFT (0.21) writes rank and alpha patterns for a mixture's fused experts that its own loader then calls
        # "ignored" (it matches them against layers, not parameters) while it applies them: every tensor loads at
        # the trained rank and scale. Remove this when PEFT matches patterns of target_parameters on load.
        warnings.filterwarnings("ignore", message=r".*_pattern keys did not match any targeted module.*")
        yield


@contextlib.contextmanager
def peft_quiet(category: type[Warning] = Warning) -> Iterator[None]:
    """Around PEFT loading, deleting or saving an adapter where lunatrain already handles what PEFT (0.21)
    warns about: saving an adapter that trains an embedding layer, it says it saves the embeddings too;
    loading or deleting one of several adapters, it says which adapter it made active instead (the chat server
    sets the adapter for every step itself). Nothing a user can act on. Goes when PEFT stops warning about
    these."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category)
        yield


def saves_embeddings(model: Any) -> bool:
    """PEFT's `save_embedding_layers`, decided from the model instead of by "auto": for an adapter that
    trains no embedding layer, "auto" (PEFT 0.21) asks the hub whether the base's config.json exists (the
    adapter names its base by hub id) to detect a resized vocabulary, a network request on every save where
    HF_HUB_OFFLINE is unset; lunatrain never resizes the vocabulary. True where an embedding layer carries
    LoRA, as "auto" decides from the config alone. Goes when PEFT looks only at a local base, or not at all."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    return any(
        isinstance(module, BaseTunerLayer) and name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
        for name, module in model.named_modules()
    )


# --- typer ---------------------------------------------------------------------------------------


def stdout_was_closed() -> bool:
    """Whether the command line parser ended the command because its output pipe closed (EPIPE): typer
    (0.2x, and click before it) then swaps sys.stdout for a wrapper that swallows further writes and exits 1,
    the status of a failed check here. Goes when typer lets EPIPE through or says so itself."""
    return type(sys.stdout).__name__.endswith("PacifyFlushWrapper")  # click's name has a leading underscore


def click_errors() -> Any:
    """The module holding the command line parser's exceptions (UsageError, ClickException,
    NoArgsIsHelpError): typer >= 0.2x vendors click as `typer._click` and raises its classes, older typer
    raises click's own. Goes when typer exports its usage error classes publicly."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


# --- uvicorn -------------------------------------------------------------------------------------

HEAD_TIMEOUT = 10.0  # seconds a connection may take to send a request's head (after connecting, or between requests)


@functools.cache
def head_timed_http() -> type:
    """uvicorn's h11 protocol (0.55) with a timer on the request head. uvicorn arms none before a request's head
    is complete, and cancels its keep-alive timer on every byte: a client that connects and sends nothing, a
    head a byte at a time (slowloris), or a body the answer did not wait for (a 401, a 404) sent a byte at a
    time, held its connection and file descriptor for good, and enough of them left no room for the
    dashboard. The timer runs from the connection, and from each response, until the next request's head is
    complete (a new request cycle), and closes the connection when it fires; while a request is being
    answered it does not run. Goes when uvicorn times out request heads itself."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimedH11(H11Protocol):
        _head_timer: Any = None
        _armed_in: Any = None  # the request cycle the timer was armed after (None: before the first)

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head()

        def _arm_head(self) -> None:
            self._disarm_head()
            self._armed_in = self.cycle
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_late)

        def _disarm_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._armed_in:  # a new request's head is complete: its answer's time now
                self._disarm_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head()  # the rest of what the client sends, and the next request's head

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head()
            super().connection_lost(exc)

    return HeadTimedH11
