"""Using an adapter: one base model in memory, its LoRA adapters loaded on demand, chat answers token by token.

`Engine` holds the configured base model (loaded on the first request, never at import or startup) and up to
`ASSISTANT_INFER_MAX_ADAPTERS` adapters attached to it through PEFT (`load_adapter` / `set_adapter`), least
recently used first out. A model name is the base model's id, an adapter name (its *active* version, read
from the registry on every request, so an activation is used by the next request without a restart) or
`name@version`.

Generation is a small loop with a KV cache per request (`Generation.step` → the next piece of text), so a
stream can be sent and stopped token by token. Every forward pass holds the engine's lock and sets its own
adapter first: concurrent requests interleave token by token, and no request ever runs on a half-loaded
adapter or on another request's adapter. Adapters in use are pinned and never evicted under a request.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import registry
from .compat import (
    building_model,
    generation_cache_argument,
    import_transformers,
    peft_quiet,
    quiet_too_long_warning,
)
from .errors import Conflict, DamagedFile, LunaError, NotFound, ServiceUnavailable, StorageError, UsageError
from .formats import normalize_text
from .settings import Settings

log = logging.getLogger("lunatrain.serving")


class TooBusy(LunaError):
    """Every generation slot is taken: answer 429 rather than queue without bound."""

    http_status = 429
    code = "rate_limit_exceeded"


@dataclass(frozen=True)
class Target:
    """What a model name resolved to: the base model alone, or one registered adapter version on it."""

    model: str  # the name answers carry: the base id, or name@version
    adapter: str | None = None
    version: str | None = None
    path: Path | None = None  # the adapter directory (resolved: a new `current` revision is a new key)
    files: tuple[Any, ...] = ()  # which files the directory held when resolved (`files_identity`)
    quantize: str = "none"  # how the base answering it is loaded (ASSISTANT_CHAT_QUANTIZE): answers differ with it
    trained_bits: int | None = None  # the base's bits when the adapter trained (QLoRA), None: full precision

    @property
    def key(self) -> tuple[Path | None, tuple[Any, ...]]:
        """What a loaded adapter is kept by: its directory and the files it held. Other weights in the same
        directory later (a version number used again after a repair, files copied over) are another adapter."""
        return self.path, self.files


# No tokenizer's token covers more characters than this on average over a prompt (long runs of spaces in code
# come nearest): a prompt with more than this many per position of the context cannot fit, and is refused
# before the chat template renders it and the tokenizer splits it (a 9 MB prompt took 12 s and 1.6 GB).
MAX_CHARS_PER_TOKEN = 64


def files_identity(path: Path) -> tuple[Any, ...]:
    """The adapter weights' and config's inode, size and modification time: changes when other files are put
    in the directory, as every write of them (a new file renamed in place, a copy over) does."""
    out: list[Any] = []
    for name in registry.ADAPTER_FILES:
        try:
            st = (path / name).stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # True when max_tokens is the server's cap, not a number the client asked for: the answer may then also
    # end at the end of the model's context, and only a prompt that leaves no room at all is refused.
    up_to_context: bool = False
    # OpenAI's penalties (-2..2) over the tokens this answer has generated so far (as vLLM reads them; the
    # prompt is not counted): a token's logit minus presence_penalty once and frequency_penalty per use.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


# --- model names ----------------------------------------------------------------------------------


def active_entry(settings: Settings, name: str, base_id: str, base_fingerprint: str) -> dict[str, Any]:
    """The version an adapter name stands for: its version active on the served base model (the registry
    keeps `active` per adapter name and base model). The one place that reads it."""
    if name not in registry.list_adapters(settings):
        raise NotFound(f"The model {name!r} does not exist; GET /v1/models lists the models served here.")
    entry = registry.active_version(settings, name, base_fingerprint)
    if entry is None:
        raise NotFound(
            f"Adapter {name!r} has no active version on {base_id}; activate one, or name a version GET /v1/models "
            f"lists ({name}@VERSION)."
        )
    return entry


_NO_MODEL = {"param": "model", "code": "model_not_found"}


def resolve(settings: Settings, model: str, base_id: str, base_fingerprint: str) -> Target:
    """A request's `model` → Target. Names only: anything that is not the base id or a registered adapter
    is a 404, whatever it looks like (a path, a URL, `..`)."""
    if model == base_id:
        return Target(model=base_id)
    try:
        name, version = registry.parse_ref(model)
        if "@" in model and version in ("", *registry.ALIASES):
            # only what /v1/models lists: `name` is the active version; `name@latest` could be a refused one
            raise UsageError("an empty version or an alias")
        if version:
            entry = registry.get_version(settings, name, version)
        else:
            entry = active_entry(settings, name, base_id, base_fingerprint)
    except UsageError:  # not even a well-formed name
        raise NotFound(
            f"The model {model[:80]!r} does not exist; GET /v1/models lists the models served here.", details=_NO_MODEL
        ) from None
    except NotFound as exc:
        raise NotFound(exc.message, details=_NO_MODEL) from None
    if entry.get("replaced"):
        raise NotFound(
            f"{name}@{entry['version']} revision {entry.get('revision')} was replaced and is gone.", details=_NO_MODEL
        )
    trained_on = entry.get("baseModel") or {}
    if not _fits(entry, base_fingerprint, registry.active_version(settings, name, base_fingerprint)):
        # The same id with other weights (updated in place, another hub revision): the base changed, not the model.
        # The adapter's name starts the second sentence as it is spelled: capitalized it would name no model.
        why = (
            f"Base model {base_id!r} has changed since {name}@{entry['version']} was trained on it (fingerprints "
            "differ); retrain it on this base."
            if registry.same_base_id(settings, trained_on.get("id"), base_id)
            else f"{name}@{entry['version']} was trained on base model {trained_on.get('id')!r}, but this server "
            f"runs {base_id!r}; its LoRA weights do not fit: serve it with ASSISTANT_BASE_MODEL="
            f"{trained_on.get('id')!r}, or ask for a version trained on this base (GET /v1/models lists them)."
        )
        raise Conflict(
            why,
            details={"param": "model", "code": "model_base_mismatch"},
        )
    try:
        path = registry.loadable_dir(settings, entry).resolve()
    except NotFound as exc:  # weights or config gone: a model that cannot be served, in OpenAI's terms; which files
        # are gone goes along (`missing`), for a page that still lists it to say why in its language
        missing = (exc.params or {}).get("missing")
        raise NotFound(exc.message, code="model_not_found", params={"missing": missing}, details=_NO_MODEL) from None
    quantization = entry.get("quantization")
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    return Target(
        model=f"{name}@{entry['version']}",
        adapter=name,
        version=entry["version"],
        path=path,
        files=files_identity(path),
        trained_bits=bits if isinstance(bits, int) else None,
    )


def _fits(entry: dict[str, Any], base_fingerprint: str, active: dict[str, Any] | None) -> bool:
    """Whether `entry`'s LoRA weights are served on this base: trained on it, or the version active on it
    (only `adapters activate --force` makes a version of another base active here: its owner said it fits,
    e.g. the same base re-downloaded, or merged into a copy of itself)."""
    trained_on = (entry.get("baseModel") or {}).get("fingerprint")
    return trained_on == base_fingerprint or registry.same_entry(entry, active)


def served_models(settings: Settings, base_id: str, base_fingerprint: str) -> list[dict[str, Any]]:
    """The names /v1/models lists: the base, each adapter with an active version on the served base, and
    every version served on it (_fits)."""
    names: list[dict[str, Any]] = []  # listed before every version: the ids a client is meant to pick
    versions: list[dict[str, Any]] = []
    for name, adapter in sorted(registry.list_adapters(settings).items()):
        active_here = registry.active_of(adapter, base_fingerprint)  # this listing's read, not one per adapter
        # What a request can be answered with: not replaced, fitting this base, its files there (a version
        # deleted by hand is marked in `adapters list`, and a 404 when asked for; it is not offered).
        fits = [
            e
            for e in adapter.get("versions", [])
            if not e.get("replaced") and _fits(e, base_fingerprint, active_here) and registry.loadable(settings, e)
        ]
        # An adapter named like the base is listed by its versions only: a request for the name reaches the base.
        active = active_here if name != base_id else None
        if active is not None and any(e["version"] == active["version"] for e in fits):
            names.append({"id": name, "kind": "active", "version": active["version"], "created": active.get("created")})
        for e in fits:
            versions.append(
                {
                    "id": f"{name}@{e['version']}",
                    "kind": "version",
                    "version": e["version"],
                    "created": e.get("created"),
                    "gate": (e.get("gate") or {}).get("passed"),
                }
            )
    out = [{"id": base_id, "kind": "base"}, *names, *versions]
    return out


def served_model(settings: Settings, model: str, base_id: str, base_fingerprint: str) -> dict[str, Any]:
    """The entry of served_models named `model` (GET /v1/models/{model}); any other name is a 404."""
    if model == base_id:  # as `resolve` answers it: the base needs no registry read (which may fail)
        return {"id": base_id, "kind": "base"}
    for entry in served_models(settings, base_id, base_fingerprint):
        if entry["id"] == model:
            return entry
    raise NotFound(
        f"The model {model[:80]!r} does not exist; GET /v1/models lists the models served here.", details=_NO_MODEL
    )


# --- tokens ---------------------------------------------------------------------------------------


def stop_ids(tokenizer: Any, *dirs: Path | None) -> list[int]:
    """The token ids that end an answer: the chat template's turn terminator (as training taught it, see
    templates.turn_terminator), the eos ids of `generation_config.json` in each directory given (the
    adapter's, then the base's) and the tokenizer's eos."""
    from .errors import LunaError
    from .templates import turn_terminator

    ids: set[int] = set()
    try:
        if tokenizer.chat_template:  # a base without one answers no chat (Engine.start); its eos still counts
            ids |= set(turn_terminator(tokenizer).stop_ids)
    except LunaError:  # a template that closes turns with nothing: the eos ids below are all there is
        pass
    for d in dirs:
        if d is None:
            continue
        try:
            eos = json.loads((d / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        ids |= {i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _adapter_tokenizer(path: Path, base_tokenizer: Any) -> Any:
    """The adapter directory's own tokenizer (and chat template) when it ships one, else the base's."""
    if not (path / "tokenizer_config.json").is_file():
        return base_tokenizer
    from .models import check_utf8_path

    check_utf8_path(path, f"adapter {path.parent.name!r}")  # in the data root, while the base may be elsewhere
    import_transformers()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise UsageError(f"The tokenizer in {path.name} could not be loaded: {exc}") from exc
    quiet_too_long_warning(tok)  # a prompt over the context is refused in one sentence (Engine.start)
    return tok if tok.chat_template else base_tokenizer


def _pick(logits: Any, s: Sampling, generator: Any, generated: Sequence[int] = ()) -> int:
    import torch

    logits = logits.float()  # a copy for any other dtype; cloned below before it is changed in place
    if generated and (s.presence_penalty or s.frequency_penalty):
        ids, counts = torch.unique(torch.tensor(generated, dtype=torch.long), return_counts=True)
        logits = logits.clone()
        logits[ids] -= s.presence_penalty + s.frequency_penalty * counts.float()
    if s.temperature < 1e-4:  # 0 means greedy; a temperature that small is greedy in all but name
        return int(torch.argmax(logits))
    # Shifted so the largest is 0: dividing by a small temperature can then not overflow into inf/nan. In
    # float64: top_p's cut is a sum of probabilities, and six of 0.1 summed in float32 stay under 0.6.
    probs = torch.softmax((logits - logits.max()).double() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= s.top_p
        drop[0] = False  # a top_p below float32's resolution would otherwise drop everything
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


# --- the engine -----------------------------------------------------------------------------------


@dataclass
class _Loaded:
    peft_name: str
    tokenizer: Any
    stop_ids: list[int]
    users: int = 0


class Engine:
    """The served base model and its loaded adapters. Thread-safe; every torch call holds `lock`."""

    def __init__(self, settings: Settings, *, max_adapters: int = 4) -> None:
        self.settings = settings
        self.max_adapters = max(1, max_adapters)
        self.lock = threading.RLock()
        self._dropped: collections.deque[Target] = collections.deque()  # see `release_later`
        self._info: Any = None
        self._served: str | None = None  # how the base is loaded for chat (`served_quantize`)
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"
        self._small = False
        self._stop_ids: list[int] = []
        self._adapters: OrderedDict[tuple[Path | None, tuple[Any, ...]], _Loaded] = OrderedDict()
        self._names = itertools.count(1)
        self.loads = 0  # adapter loads so far (for tests and the log)
        self.generated = 0  # tokens generated so far, all requests together
        self._on: Any = _UNKNOWN  # the PEFT adapter switched on now (None: adapters off)
        self.cache_kw = "cache"

    def base_info(self) -> Any:
        """The configured base model's identity (id, fingerprint) without loading its weights."""
        if self._info is None:
            from .models import resolve_base

            with self.lock:
                if self._info is None:
                    try:
                        self._info = resolve_base(None, self.settings)
                    except UsageError as exc:
                        raise _base_unavailable(exc) from exc
        return self._info

    def served_quantize(self) -> str:
        """How the base is loaded for chat: ASSISTANT_CHAT_QUANTIZE, or, for a base stored quantized by bitsandbytes
        (a `…-bnb-4bit` folder), as stored: transformers loads the stored one whatever is asked."""
        from .models import stored_quantization

        if self._served is not None:  # read once, as the base is loaded once: an edit of its config is no reload
            return self._served
        info = self.base_info()
        stored = stored_quantization(info)
        served = self.settings.chat_quantize
        if stored is not None and stored[0] == "bitsandbytes" and stored[1] is not None:
            if served not in ("none", stored[1]):
                log.warning(
                    "base model %r is stored quantized (bitsandbytes %s): chat serves it so, not in %s as "
                    "ASSISTANT_CHAT_QUANTIZE says",
                    info.id,
                    stored[1],
                    served,
                )
            served = stored[1]
        self._served = served
        return served

    def resolve(self, model: str) -> Target:
        info = self.base_info()
        try:
            return replace(resolve(self.settings, model, info.id, info.fingerprint), quantize=self.served_quantize())
        except Conflict as exc:
            raise self._restart_to_serve(model, exc) or exc from None

    def _restart_to_serve(self, model: str, refusal: Conflict) -> Conflict | None:
        """A version trained on the other weights the configured base has now (a newer hub snapshot, a model
        copied over) is refused by a server that still runs the build it loaded: that is what to say, not
        "retrain it"."""
        from .models import resolve_base

        name, version = registry.parse_ref(model)
        try:
            now = resolve_base(None, self.settings)
            entry = registry.get_version(self.settings, name, version or "active")
        except LunaError:
            return None
        trained_on = entry.get("baseModel") or {}
        if now.fingerprint == self.base_info().fingerprint or trained_on.get("fingerprint") != now.fingerprint:
            return None
        return Conflict(
            f"This server still runs the build of base model {now.id!r} it loaded when it started, and "
            f"{name}@{entry['version']} was trained on the one there now; restart `lunatrain serve` to serve it.",
            details=refusal.details,
        )

    def models(self) -> list[dict[str, Any]]:
        info = self.base_info()
        return [self._dated(e) for e in served_models(self.settings, info.id, info.fingerprint)]

    def served_model(self, model: str) -> dict[str, Any]:
        info = self.base_info()
        return self._dated(served_model(self.settings, model, info.id, info.fingerprint))

    def _dated(self, entry: dict[str, Any]) -> dict[str, Any]:
        """`entry` with the base model's `created`, as adapters carry the registry's: when its config.json was
        written here (built, downloaded or copied). Without one, OpenAI's `created` would say 1970."""
        if entry["kind"] != "base":
            return entry
        from datetime import UTC, datetime

        from .wire import iso

        try:
            stamp = (Path(self.base_info().path) / "config.json").stat().st_mtime
        except OSError:
            return entry
        return {**entry, "created": iso(datetime.fromtimestamp(stamp, UTC))}

    def _ensure_base(self) -> None:
        if self.model is not None:
            return
        from . import models
        from .startup import import_training_stack

        import_training_stack()  # the first chat request: at the imports' least cost (startup.py)
        info = self.base_info()
        self.device = models.resolve_device("auto")
        try:
            self.tokenizer = models.load_tokenizer(info, self.settings, chat=False)
            quantize = self.served_quantize()  # `serve` checked at start that it can (ASSISTANT_CHAT_QUANTIZE)
            model = models.load_model(info, self.settings, self.device, models.compute_dtype(self.device), quantize)
        except (UsageError, DamagedFile) as exc:  # missing, unfit or damaged: the server's base, not the request
            raise _base_unavailable(exc) from exc
        model.eval()
        self._small = self.device == "cpu" and sum(p.numel() for p in model.parameters()) < models.SMALL_MODEL_PARAMS
        self._stop_ids = stop_ids(self.tokenizer, Path(info.path))
        self.cache_kw = generation_cache_argument(model)
        self.model = model

    def _no_template(self, target: Target) -> ServiceUnavailable:
        """A base model without a chat template answers no chat itself (an adapter trained on it with
        --chatTemplate ships its own template); nor does an adapter saved before adapters shipped theirs."""
        info = self.base_info()
        adapters = [m["id"] for m in self.models() if m["kind"] != "base"]
        which = f"Base model {info.id!r}" if target.path is None else f"{target.model} (trained on {info.id!r})"
        helps = (
            f"ask an adapter trained on it with --chatTemplate, which ships its own (such as {adapters[0]})"
            if adapters
            else "train an adapter on it with `lunatrain luna --chatTemplate chatml`, which ships its own"
        )
        return ServiceUnavailable(
            f"{which} has no chat template, so it answers no chat itself; {helps}, or set ASSISTANT_BASE_MODEL to a "
            "model that has one.",
            details={"code": "base_model_unavailable"},
        )

    def _attach(self, target: Target) -> _Loaded:
        """The loaded adapter for `target` (loading it, evicting the least recently used idle one), pinned."""
        assert target.path is not None
        loaded = self._adapters.get(target.key)
        if loaded is None:
            loaded = self._load(target)
        self._adapters.move_to_end(target.key)
        loaded.users += 1
        self._evict()  # after pinning: the adapter just loaded is never the one to go
        return loaded

    def _load(self, target: Target) -> _Loaded:
        from peft import PeftModel

        path = target.path
        assert path is not None
        peft_name = f"adapter{next(self._names)}"  # PEFT names are module keys: no dots or @
        if target.trained_bits and target.quantize == "none":  # as the README says, and said where it happens
            log.warning(
                "%s was trained on the base model loaded in %d bits; chat serves it on the base in full precision "
                "(ASSISTANT_CHAT_QUANTIZE=%dbit serves it as it trained)",
                target.model,
                target.trained_bits,
                target.trained_bits,
            )
        if problem := registry.files_problem(path):  # said before PEFT builds layers from a config like r = 10**9
            raise StorageError(
                f"{target.model} could not be loaded onto the base model: its files under data/adapters are "
                f"damaged ({problem}): train it again or use another version.",
                details={"param": "model", "code": "storage_error"},
                # the case itself, for the dashboard: its version's files, not the data root's storage, failed
                params={"detail": "adapter.damaged", "model": target.model, "why": problem},
            )
        try:
            with building_model(), peft_quiet():
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=peft_name, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(
                        self.model, str(path), adapter_name=peft_name, is_trainable=False
                    )
        except Exception as exc:
            # Leave nothing half-loaded behind: a failed first load may have changed the base model's modules
            # in place (reload it on the next request); a failed later one may have left a partial adapter.
            if isinstance(self.model, PeftModel):
                with contextlib.suppress(Exception):
                    self.model.delete_adapter(peft_name)
                self._on = _UNKNOWN
            else:
                _switch_off_lora_layers(self.model)  # answers still running on it stay the base model's
                self.model = None
            # Say what torch's list of differing tensors means, with the first one as the example, named as
            # in the version's file (PEFT's module keys carry the engine's own name for the load).
            misfits = [m.replace(f".{peft_name}.", ".") for m in registry.base_misfits(exc)]
            if misfits:  # the request named weights of another base model: the documented 400
                raise Conflict(
                    f"{target.model} could not be loaded onto the base model: its LoRA weights do not fit this "
                    f"base model ({len(misfits)} tensors differ in shape, first {misfits[0]}).",
                    details={"param": "model", "code": "model_base_mismatch"},
                ) from exc
            # Anything else is the version's files (cut short, not safetensors, a config PEFT cannot read): the
            # request named a listed model and was fine, the storage under it is not (503, as StorageError says).
            raise StorageError(
                f"{target.model} could not be loaded onto the base model: {exc}; its files under data/adapters "
                "may be damaged: train it again or use another version.",
                details={"param": "model", "code": "storage_error"},
                params={"detail": "adapter.damaged", "model": target.model, "why": str(exc)},
            ) from exc
        self.model.eval()
        self._on = _UNKNOWN
        tok = _adapter_tokenizer(path, self.tokenizer)
        loaded = _Loaded(peft_name, tok, stop_ids(tok, path, Path(self.base_info().path)))
        self._adapters[target.key] = loaded
        self.loads += 1
        return loaded

    def _evict(self) -> None:
        for key, old in list(self._adapters.items()):
            if len(self._adapters) <= self.max_adapters:
                return
            if old.users == 0:
                with peft_quiet():  # PEFT says which adapter it made active instead; each step sets its own
                    self.model.delete_adapter(old.peft_name)
                self._on = _UNKNOWN
                del self._adapters[key]

    def release(self, target: Target) -> None:
        with self.lock:
            self._release(target)
            self._release_dropped()

    def release_later(self, target: Target) -> None:
        """`release` without waiting for the lock, for a generation the garbage collector frees: it runs in
        whatever thread allocated at the time, maybe one that holds the model-building turn (an eval gate)
        while a chat request holds the lock and waits for that turn. Done by the next caller of the lock."""
        self._dropped.append(target)

    def _release(self, target: Target) -> None:
        loaded = self._adapters.get(target.key) if target.path else None
        if loaded is not None:
            loaded.users -= 1
            self._evict()  # an adapter kept over the bound while in use goes now

    def _release_dropped(self) -> None:
        while self._dropped:
            self._release(self._dropped.popleft())

    def loaded(self) -> list[str]:
        return [str(path) for path, _ in self._adapters]

    def start(self, target: Target, messages: list[dict[str, str]], sampling: Sampling) -> Generation:
        """Load what `target` needs, render the prompt with its chat template, check the context length.
        Errors here come before any answer is sent."""
        # A request that will build (the base, or an adapter not loaded) waits for its turn before it takes the
        # lock: waiting while holding it, behind an eval gate's build, would hold up every other chat meanwhile.
        loads = self.model is None or (target.path is not None and target.key not in self._adapters)
        with building_model() if loads else contextlib.nullcontext(), self.lock:
            self._release_dropped()
            self._ensure_base()
            loaded = self._attach(target) if target.path else None
        try:
            tok = loaded.tokenizer if loaded else self.tokenizer
            if not tok.chat_template:
                raise self._no_template(target)
            limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
            chars = sum(len(m["content"]) for m in messages)
            if limit and chars > limit * MAX_CHARS_PER_TOKEN:  # before the render and the tokenizer, not after
                raise _over_context(
                    f"The prompt has {chars} characters, more than the model's context of {limit} tokens can hold.",
                    chars=chars,
                    context=limit,
                )
            # read as the training data was stored (NFC, trimmed): the same visible text, the same tokens
            messages = [m | {"content": normalize_text(m["content"])} for m in messages]
            _refuse_control_tokens(tok, messages)
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # templates refuse what their model never saw, e.g. Gemma a system turn
                raise UsageError(
                    f"The chat template of {target.model} refuses these messages: {exc}",
                    details={"param": "messages", "code": "invalid_messages"},
                ) from exc
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if limit and sampling.up_to_context:
                if len(ids) >= limit:
                    raise _over_context(
                        f"The prompt has {len(ids)} tokens, which leaves no room for an answer in the model's "
                        f"context of {limit} tokens.",
                        tokens=len(ids),
                        context=limit,
                    )
                sampling = replace(sampling, max_tokens=min(sampling.max_tokens, limit - len(ids)))
            elif limit and len(ids) + sampling.max_tokens > limit:
                raise _over_context(
                    f"The prompt has {len(ids)} tokens; with max_tokens {sampling.max_tokens} that is over the "
                    f"model's context of {limit} tokens.",
                    tokens=len(ids),
                    maxTokens=sampling.max_tokens,
                    context=limit,
                )
            return Generation(self, target, loaded, tok, ids, sampling)
        except Exception:
            if loaded is not None:
                self.release(target)
            raise

    @contextlib.contextmanager
    def _using(self, loaded: _Loaded | None):
        """Hold the lock with `loaded`'s adapter switched on (None: all adapters off)."""
        import torch

        with self.lock, torch.inference_mode():
            threads = torch.get_num_threads()
            if self._small:  # tiny matmuls lose more to thread sync than they gain (models.cpu_threads_for)
                torch.set_num_threads(1)
            try:
                self._switch(loaded.peft_name if loaded else None)
                yield
            finally:
                if self._small:
                    torch.set_num_threads(threads)

    def _switch(self, wanted: str | None) -> None:
        """Make `wanted` the adapter in use (None: adapters off). PEFT's set_adapter walks every module (half
        of a luna-tiny token's time), so it runs only when the adapter changes, not on every token."""
        from peft import PeftModel

        if wanted == self._on or not isinstance(self.model, PeftModel):
            return
        if wanted is None:
            self.model.base_model.disable_adapter_layers()
        else:
            if self._on is None or self._on is _UNKNOWN:
                self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(wanted)
        self._on = wanted


_UNKNOWN = object()  # after a load or an eviction PEFT may have changed the active adapter itself


def _switch_off_lora_layers(model: Any) -> None:
    """A first adapter load that failed has changed the base model in place: PEFT puts its LoRA layers into
    the modules before it loads the weights, and torch copies every tensor that fits before it raises. The
    engine drops that model, but an answer already running holds it: each such layer is switched off, so that
    answer goes on as the base model's (a switched-off layer computes its base layer alone)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)


def _base_unavailable(exc: UsageError | DamagedFile) -> ServiceUnavailable:
    """The configured base model cannot be found or loaded: the server's state, not the request's fault. As a
    503 a client neither blames its request (400 is "fix what you sent") nor stops retrying for good."""
    return ServiceUnavailable(
        f"{exc.message.rstrip('.')}; this server answers no model until ASSISTANT_BASE_MODEL names one it can load.",
        details={"code": "base_model_unavailable"},
    )


@dataclass
class Generation:
    """One answer being generated: `step()` returns the next piece of text, or None when done."""

    engine: Engine
    target: Target
    loaded: _Loaded | None
    tokenizer: Any
    prompt_ids: list[int]
    sampling: Sampling
    new_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _emitted: int = 0
    _past: Any = None
    _next_input: list[int] | None = None
    _generator: Any = None
    _closed: bool = False
    _text: str = ""
    on_close: Callable[[], None] | None = None  # frees what the caller holds for this answer (its slot)

    def __post_init__(self) -> None:
        import torch

        self._next_input = list(self.prompt_ids)
        # The model object as it was at the start: the engine may wrap it in PEFT (same layers) or, after a
        # failed first adapter load, drop it for a fresh one while this answer is still running on it.
        self._model = self.engine.model
        self._generator = torch.Generator(device="cpu")
        seed = self.sampling.seed if self.sampling.seed is not None else time.time_ns()
        self._generator.manual_seed(seed % 2**63)
        self._stops = self.loaded.stop_ids if self.loaded else self.engine._stop_ids
        from .tokens import hidden_in_answers

        self._hidden = hidden_in_answers(self.tokenizer)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.new_ids)

    @property
    def text(self) -> str:
        return self._text

    def step(self) -> str | None:
        """Generate until there is new text to show (or the answer ended); None once finished."""
        while self.finish_reason is None:
            if len(self.new_ids) >= self.sampling.max_tokens:
                self.finish_reason = "length"
                break
            token = self._forward()
            if token in self._stops:
                self.finish_reason = "stop"
                break
            self.new_ids.append(token)
            piece = self._advance()
            if piece:
                return piece
        piece = self._advance(final=True)
        self.close()
        return piece or None

    def run(self) -> str:
        """The whole answer at once."""
        while self.step() is not None:
            pass
        return self._text

    def _forward(self) -> int:
        import torch

        with self.engine._using(self.loaded):
            if self._past is None:
                from transformers import DynamicCache

                self._past = DynamicCache(config=self._model.config)
            ids = torch.tensor([self._next_input], device=self.engine.device)
            # The cache object grows in place; transformers renamed its argument within 5.x.
            out = self._model(input_ids=ids, use_cache=True, **{self.engine.cache_kw: self._past})
            logits = out.logits[0, -1].to("cpu")
            self.engine.generated += 1
        token = _pick(logits, self.sampling, self._generator, self.new_ids)
        self._next_input = [token]
        return token

    def _advance(self, final: bool = False) -> str:
        """Text decoded so far minus what was already returned, holding back an incomplete character and
        anything that may be the start of a stop string; cuts the answer at a stop string."""
        full = self.tokenizer.decode([t for t in self.new_ids if t not in self._hidden], skip_special_tokens=False)
        # A byte-level vocabulary can emit NUL; the chat route refuses it in a request (as the store does), so a
        # client sending this answer back as history would get a 400 for the model's own words.
        full = full.replace("\x00", "")
        hits = [at for stop in self.sampling.stop if stop and (at := full.find(stop)) >= 0]
        if hits:
            full, final = full[: min(hits)], True
            self.finish_reason = "stop"
        if final:
            safe = len(full)
            self._text = full
        else:
            safe = len(full) - max((len(s) - 1 for s in self.sampling.stop), default=0)
            if full.endswith("\ufffd"):  # half a character: wait for the token that completes it
                safe = min(safe, len(full) - 1)
        piece = full[self._emitted : safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return piece

    def close(self, *, collected: bool = False) -> None:
        """Free the KV cache, unpin the adapter and call `on_close` (idempotent; also when a client goes away).
        `collected`: called by the garbage collector, which must not wait for the engine's lock."""
        if not self._closed:
            self._closed = True
            self._past = None
            try:
                if self.loaded is not None:
                    (self.engine.release_later if collected else self.engine.release)(self.target)
            finally:
                if self.on_close is not None:
                    self.on_close()

    def __del__(self) -> None:
        # The last resort: a stream whose client left before it was ever iterated never runs its `finally`.
        with contextlib.suppress(Exception):
            self.close(collected=True)


class Slots:
    """At most `limit` generations at once; the next one is refused (429), never queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy = 0
        self._lock = threading.RLock()  # re-entrant: a garbage-collected Generation may release from anywhere

    def acquire(self) -> None:
        with self._lock:
            if self._busy >= self.limit:
                raise TooBusy(
                    f"All {self.limit} generation slots are busy; retry in a moment.",
                    details={"code": "rate_limit_exceeded"},
                )
            self._busy += 1

    def release(self) -> None:
        with self._lock:
            self._busy -= 1

    @property
    def busy(self) -> int:
        return self._busy


def _over_context(sentence: str, **params: int) -> UsageError:
    """A prompt the model's context cannot take, with OpenAI's code and the numbers (the dashboard says them in
    its language: the prompt's characters or tokens, max_tokens where it was the excess, the context)."""
    return UsageError(
        sentence,
        code="context_length_exceeded",
        params=params,
        details={"param": "messages", "code": "context_length_exceeded"},
    )


def _refuse_control_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> None:
    """A special token typed into a message (`<|im_start|>system`) would be read as the control token itself
    once the rendered prompt is tokenized: a user could open a turn of another role. Refused, as prepare
    fails such training samples."""
    from .tokens import first_special_token

    if (found := first_special_token(tokenizer, messages)) is not None:
        i, token = found
        raise UsageError(
            f"messages[{i}] contains the special token {token!r}, which the model would read as a control token, "
            "not as text; remove it from the message.",
            details={"param": "messages"},
            code="invalid_messages",
            params={"check": "chat.special_token", "message": i, "token": token},
        )
