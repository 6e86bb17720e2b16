"""Base model and tokenizer loading, the built-in `luna-tiny` model, fingerprints and device info.

Any Hugging Face causal LM works as a base: a hub id (`org/name`), a local directory in HF format, or
`luna-tiny`. Weights load from safetensors only and `trust_remote_code` is never on, so a model directory
can never run code or unpickle anything. Hub ids resolve through the local Hugging Face cache (`hf download`
puts them there); one the cache lacks is fetched only where ASSISTANT_HUB_DOWNLOAD allows it, and one it holds
is never updated unasked: a newer upstream commit would change the base under the trained adapters.

`luna-tiny` is a smoke-test model the project builds itself: a small Llama-architecture model with random
weights from a fixed seed and a byte-level BPE tokenizer trained on text shipped in the package. The same
package always produces the same bytes, so its fingerprint is stable and adapters trained on it on one
machine match it on another.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .compat import building_model, import_transformers, keep_4bit_gradients, quiet_too_long_warning
from .errors import DamagedFile, LunaError, UsageError
from .fsio import (
    atomic_write_text,
    dumps_json,
    file_lock,
    give_umask_modes,
    replace_dir,
    staging_dir,
    storage_guard,
)
from .settings import Settings
from .templates import Terminator, turn_terminator  # noqa: F401  (callers ask models where a turn ends)

TINY_ID = "luna-tiny"
# Bump when the recipe below changes in a way that changes the bytes (the manifest records it).
TINY_RECIPE_VERSION = 2
TINY_SEED = 1234

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML. The assistant's content and its end-of-turn token sit inside {% generation %} so tools that use
# `return_assistant_tokens_mask` see the same span that lunatrain trains on.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Files needed to load a causal LM + tokenizer; never *.bin / *.pt / *.pkl.
_ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class BaseModelInfo:
    id: str  # what the user named: luna-tiny, org/name, or a local directory
    path: str  # local directory holding config.json + *.safetensors
    revision: str | None  # hub commit hash when resolved from the hub cache
    config_sha256: str
    fingerprint: str  # config + weights identity; adapters record it to match their base

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """What a training report and a merge record say of the base (no local path: a data root moves)."""
        return {
            "id": self.id,
            "revision": self.revision,
            "configSha256": self.config_sha256,
            "fingerprint": self.fingerprint,
        }


# --- luna-tiny ------------------------------------------------------------------------------------


def tiny_corpus() -> list[str]:
    """The tokenizer's training text: a fixed corpus plus the bundled seed dataset when the package has one.

    Only package files are read (never the database), so the tokenizer is a function of the package.
    """
    root = resources.files("lunatrain") / "resources"
    lines = (root / "tiny" / "corpus.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    seed = root / "seed"
    if seed.is_dir():
        for entry in sorted((e for e in seed.iterdir() if e.name.endswith(".jsonl")), key=lambda e: e.name):
            for raw in entry.read_text(encoding="utf-8").splitlines():
                if raw.strip():
                    with contextlib.suppress(ValueError):
                        lines.extend(_strings(json.loads(raw)))
    return lines


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj + "\n"]
    if isinstance(obj, dict):
        return [s for k in sorted(obj) for s in _strings(obj[k])]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _train_tokenizer(corpus: list[str], vocab: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets cover the leading space too, so char spans map exactly onto tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_tiny_model(
    path: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 3072,
    model_vocab: int | None = None,
    max_positions: int = 4096,
    seed: int = TINY_SEED,
    embed_std: float | None = None,
    corpus: list[str] | None = None,
) -> Path:
    """Write a Llama-architecture causal LM with random weights and a trained BPE tokenizer to `path`.

    Deterministic: the same arguments give the same bytes (fixed seed, float32, sorted keys, no
    timestamps or version strings). `vocab` caps the tokenizer; the model's vocabulary is the tokenizer's
    size rounded up to a multiple of 64, or `model_vocab` when larger (the benchmark builds a ~17M-parameter
    model with a 16k vocabulary this way, as a real model's output layer would weigh).
    """
    import torch
    from safetensors.torch import save_file

    import_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _train_tokenizer(tiny_corpus() if corpus is None else corpus, vocab)
    n_vocab = max(-(-tok.get_vocab_size() // 64) * 64, model_vocab or 0)
    config = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 8 / 3 + 63) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.token_to_id(IM_END),
        pad_token_id=tok.token_to_id(ENDOFTEXT),
        initializer_range=0.02,
        use_cache=True,
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    # The model's own RNG stream, independent of (and not disturbing) the caller's torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
        # Wider (tied) embeddings than the 0.02 of the other layers: with 0.02 the output layer can barely
        # move the logits (|logit| <= |h| * |e| is tiny), so no adapter could show that it learned anything.
        # 0.8/sqrt(hidden) keeps the initial logits' spread the same at any width (0.1 at hidden 64).
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std or 0.8 / hidden**0.5)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}

    path.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg.pop("transformers_version", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(dict(sorted(state.items())), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "model_max_length": max_positions,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", "utf-8")
    gen = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", "utf-8")
    return path


def _tiny_recipe() -> str:
    corpus = "".join(tiny_corpus())
    ident = {"recipe": TINY_RECIPE_VERSION, "seed": TINY_SEED, "corpus": hashlib.sha256(corpus.encode()).hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def ensure_tiny(settings: Settings) -> Path:
    """Build data/models/luna-tiny if missing or built by a different recipe; return its directory.

    Built in a temp dir and renamed into place under a lock, so concurrent callers never see half a model.
    The build is deterministic, so a finished one is also kept in the user's cache directory
    (`$XDG_CACHE_HOME/lunatrain`, else `~/.cache/lunatrain`) by recipe: another data root on the same machine
    copies it instead of training the tokenizer and building the model again.
    """
    target = settings.models_dir / TINY_ID
    manifest = target / "luna-tiny.json"
    recipe = _tiny_recipe()
    if _manifest_recipe(manifest) == recipe:
        return target
    with file_lock(settings.models_dir / f".{TINY_ID}.lock"):
        if _manifest_recipe(manifest) == recipe:
            return target
        tmp = staging_dir(settings.models_dir, TINY_ID)
        try:
            with storage_guard(target):  # a full disk while copying or building: one sentence, not a traceback
                cache = _tiny_cache()
                cached = cache / f"{TINY_ID}-{recipe[:16]}" if cache is not None else None
                if cached is not None and _manifest_recipe(cached / "luna-tiny.json") == recipe:
                    shutil.rmtree(tmp)
                    shutil.copytree(cached, tmp)  # copies the cache's modes, which an older release left private
                else:
                    build_tiny_model(tmp)
                    atomic_write_text(tmp / "luna-tiny.json", dumps_json({"id": TINY_ID, "recipe": recipe}))
                    if cached is not None:
                        _keep_in_cache(tmp, cached)
                give_umask_modes(tmp)  # safetensors wrote the weights 0600
                replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tiny_cache() -> Path | None:
    """The machine cache of luna-tiny builds; None where there is no home to keep it in (HOME unset and no
    passwd entry, as in a container run with a random uid): the cache is an optimisation."""
    base = os.environ.get("XDG_CACHE_HOME")
    # A relative path is ignored, as the XDG spec asks: it would put the cache under whatever directory a
    # command runs in (a data root, a project's working tree).
    if not base or not os.path.isabs(base):
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):
            return None
    return Path(base) / "lunatrain" if os.path.isabs(base) else None


def _keep_in_cache(built: Path, cached: Path) -> None:
    """Copy a finished build into the machine cache, whole or not at all (a copy renamed into place); the
    cache is an optimisation, so any failure to write it is ignored."""
    with contextlib.suppress(OSError):
        staging = staging_dir(cached.parent, cached.name)
        try:
            shutil.rmtree(staging)
            shutil.copytree(built, staging)
            os.rename(staging, cached)  # fails when another process cached it first: theirs is identical
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _manifest_recipe(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("recipe")
    except (OSError, ValueError):
        return None


# --- resolving and loading ------------------------------------------------------------------------


def local_dir(ref: str, root: Path | None = None) -> Path | None:
    """The directory `ref` names, absolute: as written (from the working directory, `~` expanded), else, for
    a relative name and a `root`, under that root; None when it names no directory. With `root` the data
    root, a relative name is found as the trainer (working there) took it: registry entries written before
    the command line and the API made such names absolute still name their base this way."""
    if "\x00" in ref:
        return None
    try:
        local = Path(ref).expanduser()
        if local.is_dir():
            return local.resolve()
        if root is not None and not local.is_absolute() and (root / local).is_dir():
            return (root / local).resolve()
    except (RuntimeError, OSError):  # "~user" of no such user; a name longer than the file system allows
        pass
    return None


def _is_file(ref: str) -> bool:
    try:
        return Path(ref).expanduser().is_file()
    except (RuntimeError, OSError):  # `~nouser/x`: no such home to expand; a name too long
        return False


def resolve_base(ref: str | None, settings: Settings) -> BaseModelInfo:
    """Find the base model's local directory (building luna-tiny if needed) and compute its identity."""
    ref = ref or settings.base_model
    revision = None
    if ref == TINY_ID:
        path = ensure_tiny(settings)
    elif (found := local_dir(ref, settings.home)) is not None:
        path = found
    elif ref.startswith(("/", "~", "./", "../")):  # written as a path: no hub id looks like this
        if _is_file(ref):  # a weights file or any other: the folder is what is meant
            raise UsageError(
                f"Base model {ref!r} is a file: name the model's folder (the one holding config.json).",
                code="base_model.a_file",
                params={"baseModel": ref},
            )
        raise UsageError(
            f"Base model directory {ref!r} does not exist.", code="base_model.no_directory", params={"baseModel": ref}
        )
    elif _HUB_ID.fullmatch(ref):
        try:
            path, revision = _from_hub(ref, settings.hub_download)
        except UsageError as err:
            folder = settings.home / ref
            if err.code != "base_model.not_cached" or not folder.parent.is_dir():
                raise
            # `models/fam` may have named a folder under the data root that is gone (moved, deleted), or a hub
            # model of an org whose name a folder there has: both are said, never only the download advice
            # for a repository that may not exist.
            raise UsageError(
                f"{err.message.rstrip('.')}. If {ref!r} named a folder under the data root instead: {folder} does "
                "not exist; restore it.",
                code=err.code,
                params=err.params | {"folder": str(folder)},
            ) from None
    else:
        raise UsageError(
            f"Base model {ref!r} is neither 'luna-tiny', a local model directory, nor a hub id 'org/name'.",
            code="base_model.unknown_form",
            params={"baseModel": ref},
        )
    refuse_adapter_dir(path, ref)
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(
            f"Base model {ref!r} has no config.json in {path}.",
            code="base_model.no_config",
            params={"baseModel": ref, "path": str(path)},
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise UsageError(
            f"Base model {ref!r} has no safetensors weights in {path} (other formats are refused).",
            code="base_model.no_weights",
            params={"baseModel": ref, "path": str(path)},
        )
    named = "model.safetensors" in {w.name for w in weights} or os.path.lexists(path / "model.safetensors.index.json")
    if not named:
        # transformers loads model.safetensors, or the shards its index names: shards without the index (a
        # download cut to `*.safetensors`), or weights under another name, would fail only once a run began.
        found = ", ".join(w.name for w in weights[:3]) + (", …" if len(weights) > 3 else "")
        raise UsageError(
            f"Base model {ref!r} has neither model.safetensors nor the model.safetensors.index.json that names "
            f"its shards in {path} (it holds {found}); copy the index that came with the shards.",
            code="base_model.no_index",
            params={"baseModel": ref, "path": str(path), "files": found},
        )
    _refuse_unsafe_index(path, ref)
    config_bytes = config.read_bytes()
    _refuse_custom_code(config_bytes, path, ref)
    try:
        fingerprint = _witnessed(_fingerprint(config_bytes, path, weights), weights, settings)
    except OSError as exc:  # a weights link to a blob that is not there, an unreadable file
        gone = Path(exc.filename) if exc.filename else path
        raise DamagedFile(
            f"Base model {ref!r} cannot be read: {gone} is missing or cannot be opened ({exc.strerror or exc}), as "
            "after a download cut short; download or copy the model again."
        ) from None
    return BaseModelInfo(
        id=ref,
        path=str(path),
        revision=revision,
        config_sha256=hashlib.sha256(config_bytes).hexdigest(),
        fingerprint=fingerprint,
    )


def _refuse_unsafe_index(path: Path, ref: str) -> None:
    """transformers loads the shards model.safetensors.index.json names, whatever their format: a `.bin`
    there would be unpickled (torch.load) although a `.safetensors` file lies beside it. Every file it names
    must be safetensors, in this directory, and there."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return

    def refuse(said: str) -> UsageError:
        return UsageError(
            f"Base model {ref!r}: its model.safetensors.index.json {said}.",
            code="base_model.unsafe_index",
            params={"baseModel": ref, "problem": said},
        )

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise refuse(f"cannot be read ({type(exc).__name__})") from None
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise refuse(f"names weights outside its directory ({name})")
        if not name.endswith(".safetensors"):
            raise refuse(f"names weights in another format than safetensors ({name})")
        if not (path / name).is_file():
            raise refuse(f"names weights that are not there ({name})")


def _refuse_custom_code(config_bytes: bytes, path: Path, ref: str) -> None:
    """A model_type transformers does not ship, with `auto_map`: only the directory's own Python could build
    it, which lunatrain never runs (trust_remote_code stays off). Said here, before prepare passes it."""
    try:
        config = json.loads(config_bytes)
    except ValueError:
        return  # loading says what is wrong with it
    if not isinstance(config, dict) or "auto_map" not in config:
        return
    import_transformers()
    from transformers import CONFIG_MAPPING  # its `in` reads the name table (and registered types), imports nothing

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"Base model {ref!r} needs its own code (model_type {model_type!r}, auto_map in config.json), which "
            "lunatrain never runs; use a model of an architecture transformers ships.",
            code="base_model.custom_code",
            params={"baseModel": ref, "modelType": str(model_type)},
        )


def refuse_adapter_dir(path: str | Path | None, ref: str | None = None) -> None:
    """A LoRA adapter (a directory with adapter_config.json) is not a base model: training on it would be
    an adapter on an adapter, which lunatrain never does (guide §7). Refused with the reason and the way on."""
    if path is None or not (Path(path) / "adapter_config.json").is_file():
        return
    raise UsageError(
        f"baseModel {ref or str(path)!r} is a LoRA adapter (it has adapter_config.json), not a base model: an adapter "
        "on an adapter is not supported. Train on the base model it was made for, or merge it first "
        "(`lunatrain merge --adapter NAME@VERSION`) and use the merged model under data/models/merged/.",
        code="base_model.is_adapter",
        params={"baseModel": ref or str(path)},
    )


def fetch_if_allowed(ref: str, settings: Settings) -> None:
    """Fetch the hub id `ref` into the local Hugging Face cache when this process may (ASSISTANT_HUB_DOWNLOAD) and
    the cache lacks it; nothing for luna-tiny, a local directory, or a cached id. What a command that submits a
    job does first: the trainer reads only its own environment, and would refuse what the user allowed."""
    if settings.hub_download and ref != TINY_ID and local_dir(ref, settings.home) is None and _HUB_ID.fullmatch(ref):
        _from_hub(ref, download=True)


def _from_hub(repo_id: str, download: bool = False) -> tuple[Path, str | None]:
    """The cached snapshot of `repo_id` (the commit refs/main names); with `download`, fetched when the cache
    lacks it."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = huggingface_hub.snapshot_download(repo_id, allow_patterns=_ALLOW, local_files_only=True)
    except LocalEntryNotFoundError as exc:
        repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        if repo.is_dir():  # there, but not whole: never fetched over (that could bring another commit)
            return _cached_not_whole(repo_id, repo, download and not constants.HF_HUB_OFFLINE)
        if not download or constants.HF_HUB_OFFLINE:
            how = "set ASSISTANT_HUB_DOWNLOAD=true to let lunatrain fetch it"
            if download:
                how = "unset HF_HUB_OFFLINE to let lunatrain fetch it"
            raise UsageError(
                f"Base model {repo_id!r} is not in the local Hugging Face cache: download it once (`hf download "
                f"{repo_id}`), or {how}.",
                code="base_model.not_cached",
                params={"baseModel": repo_id},
            ) from exc
        try:
            local = huggingface_hub.snapshot_download(repo_id, allow_patterns=_ALLOW, local_files_only=False)
        except Exception as fetch:  # network, auth, missing repo: one sentence, not a traceback
            raise UsageError(f"Base model {repo_id!r} could not be fetched: {fetch}") from fetch
    except Exception as exc:  # a cache it cannot read
        raise UsageError(f"Base model {repo_id!r} could not be read from the Hugging Face cache: {exc}") from exc
    path = Path(local)
    # Hub cache snapshots live in snapshots/<commit>/: that commit is the revision.
    revision = path.name if path.parent.name == "snapshots" else None
    return path, revision


def _cached_not_whole(repo_id: str, repo: Path, download: bool) -> tuple[Path, str | None]:
    """A hub id the cache holds but cannot resolve: the one snapshot of a download pinned to a commit (no
    refs/main); an interrupted download of the commit refs/main names, completed with `download` (that commit
    only: never a newer one); else said, with the command that completes it."""
    import huggingface_hub

    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    ref = repo / "refs" / "main"
    said = {"code": "base_model.not_cached", "params": {"baseModel": repo_id}}
    if not ref.is_file():
        if len(snapshots) == 1:
            return snapshots[0], snapshots[0].name
        if snapshots:
            raise UsageError(
                f"Base model {repo_id!r} has {len(snapshots)} snapshots in the local Hugging Face cache and no "
                f"refs/main to tell which is meant: download the one you mean (`hf download {repo_id} --revision "
                "COMMIT`).",
                **said,
            )
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
    if commit and download:
        try:
            local = huggingface_hub.snapshot_download(
                repo_id, revision=commit, allow_patterns=_ALLOW, local_files_only=False
            )
        except Exception as fetch:  # network, auth: one sentence
            raise UsageError(f"Base model {repo_id!r} could not be completed in the cache: {fetch}", **said) from fetch
        return Path(local), commit
    pin = f" --revision {commit}" if commit else ""
    raise UsageError(
        f"Base model {repo_id!r} is in the local Hugging Face cache but not whole (an interrupted download): complete "
        f"it (`hf download {repo_id}{pin}`), or set ASSISTANT_HUB_DOWNLOAD=true to let lunatrain complete it.",
        **said,
    )


def _fingerprint(config_bytes: bytes, path: Path, weights: list[Path]) -> str:
    """sha256 over config.json, the weights index and each weights file's header, size and sampled content.

    Reading every byte of a multi-GB model on each run would cost seconds; the safetensors header (names,
    shapes, dtypes, offsets) plus 1 MiB samples at the start, middle and end tell bases apart in practice.
    Files up to 8 MiB (luna-tiny) are hashed in full.
    """
    h = hashlib.sha256()
    h.update(config_bytes)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        h.update(index.read_bytes())
    for w in weights:
        size = w.stat().st_size
        h.update(f"{w.name}:{size}".encode())
        with open(w, "rb") as fh:
            if size <= _SAMPLED_ABOVE:
                h.update(fh.read())
                continue
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 64 << 20)))
            for pos in (0, size // 2, max(0, size - (1 << 20))):
                fh.seek(pos)
                h.update(fh.read(1 << 20))
    return h.hexdigest()


_SAMPLED_ABOVE = 8 << 20  # `_fingerprint` hashes larger weights files by samples


def _witnessed(sampled: str, weights: list[Path], settings: Settings) -> str:
    """The base's fingerprint: `sampled`, unless its weights hold other content than the data root first saw
    under that sampled fingerprint. Weights changed in place where the samples do not look (an attention-only
    LoRA merged and saved over the same files) are then another base, and its versions are not served on it
    or taken as trained on it; put back, the files are the first base again. The sampled value stays the
    fingerprint (registries and active versions are keyed by it); the full hash is read once per change of
    the files (`_content_hash`). Where nothing can be kept (a read-only data root), the sampled one."""
    if all(w.stat().st_size <= _SAMPLED_ABOVE for w in weights):
        return sampled  # hashed in full already
    folder = settings.cache_dir / "fingerprints"
    if not _can_keep(folder):  # nothing witnessed can be kept, nor the hash: reading GBs each command for nothing
        return sampled
    full = _content_hash(weights, folder)
    seen = folder / f"{sampled}.txt"
    try:
        first = seen.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        first = None
    except (OSError, UnicodeError):
        return sampled
    if first is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(seen, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # the first witness wins a race
        except FileExistsError:
            first = seen.read_text(encoding="ascii").strip()
        except OSError:
            return sampled
        else:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(full + "\n")
            return sampled
    return sampled if first in ("", full) else hashlib.sha256(f"{sampled}\0{full}".encode()).hexdigest()


def _can_keep(folder: Path) -> bool:
    """Whether files can be written in `folder` (made if need be): not in a data root on a read-only mount."""
    for path in (folder, *folder.parents):
        if path.exists():
            return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    return False


def _content_hash(weights: list[Path], folder: Path) -> str:
    """sha256 over every byte of the weights files, kept in `folder` by each file's identity on disk (device,
    inode, size, modification and change times): read in full once per change of the files, not per run."""
    ident = [(str(w.resolve()), *_stat_identity(w)) for w in weights]
    kept = folder / f"content-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]}.txt"
    try:
        value = kept.read_text(encoding="ascii").strip()
        if len(value) == 64:
            return value
    except (OSError, UnicodeError):
        pass
    h = hashlib.sha256()
    for w in weights:
        with open(w, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    value = h.hexdigest()
    with contextlib.suppress(OSError, LunaError):  # kept where it can be: a read-only root hashes again
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(kept, value + "\n")
    return value


def _stat_identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def load_tokenizer(
    ref: str | BaseModelInfo | None, settings: Settings, chat_template: str | None = None, *, chat: bool = True
):
    """The base model's fast tokenizer with its chat template (or the `chat_template` named, see
    `templates`); refuses tokenizers without a chat template, unless `chat` is False (serving: adapters
    trained with --chatTemplate ship their own, and only the base itself cannot chat)."""
    return load_chat_tokenizer(ref, settings, chat_template, chat=chat)[0]


def load_chat_tokenizer(
    ref: str | BaseModelInfo | None, settings: Settings, chat_template: str | None = None, *, chat: bool = True
):
    """(tokenizer, added): as `load_tokenizer`, plus the template's marker tokens that had to be added to
    the vocabulary (training learns their embedding rows)."""
    import_transformers()
    from transformers import AutoTokenizer

    from .templates import apply_template

    info = ref if isinstance(ref, BaseModelInfo) else resolve_base(ref, settings)
    check_utf8_path(info.path, f"base model {info.id!r}")
    _refuse_unknown_type(info)
    try:
        tok = AutoTokenizer.from_pretrained(info.path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        if _only_sentencepiece(info):  # transformers' reason then names an unrelated package (tiktoken)
            raise _no_fast_tokenizer(info) from None
        if not any(Path(info.path, name).is_file() for name in _VOCABULARY_FILES):
            raise _no_vocabulary(info) from None  # transformers' reason: several lines on slow tokenizers
        said = " ".join(str(exc).split())
        raise UsageError(f"The tokenizer of base model {info.id!r} could not be loaded: {said}") from exc
    if not getattr(tok, "is_fast", False):
        raise _no_fast_tokenizer(info)
    _refuse_empty_vocabulary(tok, info)
    added = apply_template(tok, chat_template, settings, info.id) if chat or chat_template or tok.chat_template else []
    _pad_with_a_row(tok, info)
    quiet_too_long_warning(tok)
    return tok, added


def config_of(info: BaseModelInfo) -> dict[str, Any]:
    """The base model's config.json as an object; empty where it cannot be read or is none (resolve_base read it:
    a file gone or damaged since then is said where the model loads)."""
    try:
        cfg = json.loads(Path(info.path, "config.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def embedding_rows(info: BaseModelInfo) -> int | None:
    """The rows of the base model's input embeddings, as its config.json says them (the language model's, in a
    multimodal config); None where it does not say (loading the model then tells)."""
    cfg = config_of(info)
    for part in (cfg.get("text_config"), cfg):
        rows = part.get("vocab_size") if isinstance(part, dict) else None
        if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0:
            return rows
    return None


def _pad_with_a_row(tok: Any, info: BaseModelInfo) -> None:
    """Pad with the eos where the tokenizer has no pad token, or one without an embedding row: a pad added to a
    tokenizer without resizing the model (`add_special_tokens({"pad_token": …})` alone) made every padded batch
    and the gate's generation fail with "index out of range in self". Padding is masked out anyway; a pad id
    just has to exist in the model."""
    rows = embedding_rows(info)
    if tok.pad_token is None or (rows is not None and tok.pad_token_id is not None and tok.pad_token_id >= rows):
        tok.pad_token = tok.eos_token


def _only_sentencepiece(info: BaseModelInfo) -> bool:
    folder = Path(info.path)
    return (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file()


def _no_fast_tokenizer(info: BaseModelInfo) -> UsageError:
    said = " (it has only a SentencePiece tokenizer.model)" if _only_sentencepiece(info) else ""
    return UsageError(
        f"Base model {info.id!r} has no fast tokenizer (tokenizer.json){said}; lunatrain needs one: copy the "
        "model's tokenizer.json into its folder, or write it there once with transformers where the "
        "sentencepiece package is installed (AutoTokenizer.from_pretrained(folder).save_pretrained(folder)).",
        code="base_model.no_fast_tokenizer",
        params={"baseModel": info.id, "path": info.path},
    )


# What a tokenizer's vocabulary can be read from: the fast tokenizer's file, or the slow files it is built from.
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model", "tekken.json")


def _refuse_empty_vocabulary(tok: Any, info: BaseModelInfo) -> None:
    """A folder without tokenizer.json (nor vocab.json and merges.txt) still gives transformers a "fast"
    tokenizer of some classes (Qwen2's): one that knows only special tokens and turns every text into nothing.
    Trained on, it would teach only the template's markers, and pass. A vocabulary of any script counts
    (one that cannot spell a German word is still one)."""
    specials = set(tok.all_special_ids)
    vocabulary = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    if not any(i not in specials for i in vocabulary.values()):
        raise _no_vocabulary(info)


def _no_vocabulary(info: BaseModelInfo) -> UsageError:
    return UsageError(
        f"Base model {info.id!r} has no tokenizer vocabulary in {info.path} (its tokenizer knows only special "
        "tokens): every text would be tokenized to nothing; copy the model's tokenizer files (tokenizer.json, or "
        "vocab.json with merges.txt) there.",
        code="base_model.no_vocabulary",
        params={"baseModel": info.id, "path": info.path},
    )


def _refuse_unknown_type(info: BaseModelInfo) -> None:
    """A model_type this transformers release does not ship, without `auto_map` (see `_refuse_custom_code`):
    its model would fail to load only once a run began, with transformers' advice to upgrade it; and one it
    ships without a causal-LM class."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config_of(info).get("model_type")
    if not isinstance(model_type, str):
        return
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise UsageError(
            f"Base model {info.id!r} is of model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know; use a model of an architecture it ships.",
            code="base_model.unknown_type",
            params={"baseModel": info.id, "modelType": model_type},
        )
    # A type transformers knows but has no causal LM class for (Mistral 3's vision model, T5): loading it would
    # fail with transformers' list of every class it could load, some 230 names. An `auto_map` changes nothing:
    # the folder's own classes never run.
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(
            f"Base model {info.id!r} is of model_type {model_type!r}, which transformers cannot load as a causal "
            "language model (AutoModelForCausalLM); use the text-only model of that family or another base.",
            code="base_model.not_causal_lm",
            params={"baseModel": info.id, "modelType": model_type},
        )


def check_utf8_path(path: str | Path, what: str) -> None:
    """Refuse a folder the tokenizer library (and safetensors) cannot open: they open files by their names in
    UTF-8, whatever the locale. A name whose bytes are no UTF-8 (written under a Latin-1 locale), or one in
    UTF-8 that a non-UTF-8 locale decoded as something else, would be "No such file or directory" there."""
    raw = os.fsencode(path)
    try:
        if raw == str(path).encode("utf-8"):
            return
    except UnicodeError:
        pass
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"The folder of {what} has a name that is not UTF-8 (the byte 0x{raw[exc.start]:02X} in "
            f"{os.fsdecode(raw)!r}), and the tokenizer library opens files by UTF-8 names only; rename it (or the "
            "data root above it) to a UTF-8 or ASCII name."
        ) from None
    raise UsageError(
        f"The folder of {what} has a UTF-8 name, but this process reads names in "
        f"{sys.getfilesystemencoding()}, and the tokenizer library opens files by UTF-8 names only; run lunatrain "
        "under a UTF-8 locale (LANG=C.UTF-8) or with PYTHONUTF8=1."
    )


def load_adapter_tokenizer(adapter_dir: str | Path, base: BaseModelInfo, settings: Settings):
    """The tokenizer an adapter was trained with (saved beside it, with its chat template and any added
    tokens); the base model's for adapters saved before tokenizers were shipped with them."""
    import_transformers()
    from transformers import AutoTokenizer

    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return load_tokenizer(base, settings)
    check_utf8_path(adapter_dir, f"adapter {Path(adapter_dir).name!r}")
    try:
        tok = AutoTokenizer.from_pretrained(str(adapter_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # files that read as JSON but are no tokenizer: the tokenizers
        # library raises a plain Exception ("Model missing"), transformers a KeyError or ValueError
        where = settings.shown(Path(adapter_dir))
        said = " ".join(str(exc).split())[:200] or "no message"
        raise DamagedFile(
            f"The tokenizer in {where} cannot be loaded ({type(exc).__name__}: {said}); its files are damaged: "
            "train it again, or roll back to another version."
        ) from exc
    _pad_with_a_row(tok, base)  # also for an adapter trained before a pad without a row was replaced
    quiet_too_long_warning(tok)
    return tok


def damaged_weights(info: BaseModelInfo, exc: BaseException) -> DamagedFile:
    """The one sentence for a base model whose weight files cannot be read (storage_error, not the request's
    fault), naming them and the fix."""
    files = ", ".join(sorted(p.name for p in Path(info.path).glob("*.safetensors"))) or "its weights"
    return DamagedFile(
        f"Base model {info.id!r} could not be loaded: {files} in {info.path} is damaged ({exc}); "
        "copy or download the model again."
    )


def _unreadable_weights(exc: BaseException) -> bool:
    """Whether loading failed on the weight files themselves (safetensors could not read one), anywhere in
    the exception's chain (transformers may wrap it)."""
    from safetensors import SafetensorError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SafetensorError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def native_bf16() -> bool:
    """Whether the current CUDA device computes bfloat16 in hardware (Ampere and later). torch's default
    check also says yes where it only emulates it (a T4, a V100): slow, and without its kernels."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))


def compute_dtype(device: str) -> Any:
    """The dtype a model computes in on `device`, in training, the eval gate and chat alike: bfloat16 on a
    CUDA device that has it natively, else float32 (no float16 path: its range overflows in training)."""
    import torch

    return torch.bfloat16 if device == "cuda" and native_bf16() else torch.float32


def load_model(
    ref: str | BaseModelInfo | None, settings: Settings, device: str = "cpu", dtype: Any = None, quantize: str = "none"
):
    """Load the base causal LM from safetensors onto `device` (`dtype`: torch dtype or None for float32).

    `quantize` 4bit/8bit loads the linear layers of the decoder through bitsandbytes (QLoRA): NF4 with double
    quantization computing in `dtype` (`compute_dtype`: bfloat16 on a GPU that has it natively, else float32),
    or LLM.int8. Embeddings and the output layer stay in `dtype`. Such a model trains LoRA adapters but is
    never merged into (merge.py loads the full-precision base)."""
    import torch

    import_transformers()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    info = ref if isinstance(ref, BaseModelInfo) else resolve_base(ref, settings)
    hf_logging.disable_progress_bar()  # lunatrain shows its own progress; the per-tensor bar is noise
    extra: dict[str, Any] = {}
    if quantize != "none":
        extra = {"device_map": {"": torch.cuda.current_device() if device == "cuda" else "cpu"}}
        if stored_quantization(info) != ("bitsandbytes", quantize):  # stored so, it loads so (and warns at ours)
            extra["quantization_config"] = quantization_config(quantize, dtype or torch.float32)
    try:
        with building_model():
            model = AutoModelForCausalLM.from_pretrained(
                info.path,
                dtype=dtype or torch.float32,
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                **extra,
            )
    except UsageError:
        raise
    except Exception as exc:
        if _unreadable_weights(exc):  # the request was right; the files are not (a copy cut short, a full disk)
            raise damaged_weights(info, exc) from exc
        raise UsageError(f"Base model {info.id!r} could not be loaded: {exc}") from exc
    if quantize == "none":
        return model.to(device)
    keep_4bit_gradients(model)  # else an eval pass takes the gradients off the 4-bit layers for good
    return model  # placed by device_map: bitsandbytes models refuse .to()


class ModuleMap(dict[str, str]):
    """Each module's qualified name → its class name, and two sets of names: `adaptable`, the modules LoRA can
    wrap (PEFT's linear, embedding and convolution layers, subclasses included: Gemma's scaled embedding), and
    `tied`, the input embedding and the output layer when they share one weight."""

    adaptable: frozenset[str] = frozenset()
    tied: frozenset[str] = frozenset()


# The config keys that say how many positions a model takes (GPT-2's names, then most families'); multimodal
# configs keep the language model's inside `text_config`.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions")


def context_length(info: BaseModelInfo) -> int | None:
    """The base model's context in tokens as its config.json states it, or None where it states none."""
    cfg = config_of(info)
    cfg = cfg.get("text_config") or cfg
    for key in _CONTEXT_KEYS:
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def module_kinds(info: BaseModelInfo) -> ModuleMap:
    """The model's modules (see ModuleMap), from the base model's config alone: the model is built on the meta
    device, so no weight is read and no memory is taken (prepare and the run check targetModules with it,
    before any weight is loaded)."""
    import torch

    import_transformers()
    from transformers.pytorch_utils import Conv1D

    model = meta_model(info)
    nn = torch.nn
    lora_layers = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    # The parts beside a multimodal model's language model are never adapted (`lora_exclusions`): a name only
    # they have names no module a run would train.
    beside = lora_exclusions(model, [])
    kept = [(n, m) for n, m in model.named_modules() if not (beside and re.fullmatch(beside, n))]
    modules = ModuleMap({name: type(module).__name__ for name, module in kept})
    modules.adaptable = frozenset(name for name, m in kept if isinstance(m, lora_layers))
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and outputs is not None and getattr(outputs, "weight", None) is inputs.weight:
        named = {id(m): name for name, m in model.named_modules()}
        modules.tied = frozenset({named[id(inputs)], named[id(outputs)]})
    return modules


def meta_model(info: BaseModelInfo) -> Any:
    """The base model built from its config on the meta device: its modules and their shapes, no weights."""
    import torch

    import_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(info.path, trust_remote_code=False, local_files_only=True)
        with building_model(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:
        raise UsageError(f"Base model {info.id!r} could not be built from its config.json: {exc}") from exc


@dataclass(frozen=True)
class LoraLayout:
    """What PEFT puts on a model for a targetModules value (`lora_layout`)."""

    per_rank: int  # LoRA parameters at rank 1: a run's are its rank times this (PEFT's rank patterns scale with r)
    parameters: tuple[str, ...]  # fused parameters it wraps besides layers: a mixture's experts, its router
    attention: tuple[str, ...] = ()  # the names of the language model's attention layers (q_proj, …; MLA's own)


def lora_layout(info: BaseModelInfo, targets: str | list[str] | tuple[str, ...]) -> LoraLayout | None:
    """PEFT's own choice of what `targets` adapts on the model built on the meta device (no weight read): with
    all-linear on a mixture of experts (Qwen3-MoE, Mixtral, OLMoE) PEFT also wraps the fused expert
    parameters, which no rule of ours could foresee per family and release. None where the model cannot be
    built or the targets fit nothing (the run says why)."""
    try:
        digest = hashlib.sha256(Path(info.path, "config.json").read_bytes()).hexdigest()
    except OSError:
        return None
    return _lora_layout(info.path, digest, info.id, targets if isinstance(targets, str) else tuple(targets))


@functools.lru_cache(maxsize=16)
def _lora_layout(path: str, digest: str, name: str, targets: str | tuple[str, ...]) -> LoraLayout | None:
    """`lora_layout` once per process for a config (`digest`: its bytes') and targets."""
    try:
        model = meta_model(BaseModelInfo(id=name, path=path, revision=None, config_sha256=digest, fingerprint=""))
    except UsageError:
        return None
    return lora_layout_of(model, targets)


# Where transformers keeps each architecture's own classes.
_MODEL_CODE = "transformers.models."


def _language_model(model: Any) -> Any:
    """The decoder of a causal LM: a multimodal model's language model (beside its vision tower); transformers'
    get_decoder falls back to the model itself, and a model of no transformers class has none."""
    find = getattr(model, "get_decoder", None)
    return model if find is None else find()


def lora_exclusions(model: Any, targets: str | list[str] | tuple[str, ...]) -> str | None:
    """PEFT's `exclude_modules` for `targets` (None where nothing is left out), a pattern of:
    - the parts beside a multimodal model's language model that hold linear layers (Gemma 3's vision tower,
      whose attention has the language model's layer names): text-only data never reaches them, so their LoRA
      would stay zero and cost memory for nothing;
    - with all-linear, linear layers whose class computes something else than a linear map (Llama 4's router
      returns the routing scores with the chosen experts): PEFT's LoRA layer adds its update to what the layer
      returns, and fails on a tuple ("'tuple' object has no attribute 'dtype'"). A list names its layers."""
    import torch

    names = {id(m): name for name, m in model.named_modules()}
    decoder = _language_model(model)
    path = names.get(id(decoder), "").split(".") if decoder is not model else []
    inside = {id(m) for m in decoder.modules()}
    output = model.get_output_embeddings()
    parts, layers = set(), set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if id(module) not in inside:
            steps = name.split(".")
            shared = next((i for i, (a, b) in enumerate(zip(steps, path, strict=False)) if a != b), len(path))
            parts.add(".".join(steps[: shared + 1]))
        elif (
            targets == "all-linear"
            and type(module).forward is not torch.nn.Linear.forward
            and type(module).__module__.startswith(_MODEL_CODE)
        ):
            layers.add(name)  # a model's own linear class (not a quantized layer: bitsandbytes' compute W x too)
    if not parts and not layers:
        return None
    either = [rf"{re.escape(p)}(?:\..*)?" for p in sorted(parts)] + [re.escape(n) for n in sorted(layers)]
    return "(?:" + "|".join(either) + ")"


def lora_layout_of(model: Any, targets: str | list[str] | tuple[str, ...]) -> LoraLayout | None:
    """`lora_layout` of a model built on the meta device, which PEFT wraps in place (use it for nothing else)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from .compat import peft_wrapping

    attention = _attention_layers(model)  # before PEFT wraps the layers (their LoRA parts are linear layers too)
    try:
        config = LoraConfig(
            r=1,
            lora_alpha=1,
            lora_dropout=0.0,  # the one setting LoRA on experts refuses, and which adds no parameter
            target_modules=targets if isinstance(targets, str) else list(targets),
            exclude_modules=lora_exclusions(model, targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with peft_wrapping(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = get_peft_model(model, config)
    except (ValueError, TypeError, AttributeError):
        return None
    count = sum(p.numel() for n, p in wrapped.named_parameters() if ".lora_" in n)
    fused = tuple(sorted(wrapped.peft_config["default"].target_parameters or ()))
    return LoraLayout(count, fused, attention)


def _attention_layers(model: Any) -> tuple[str, ...]:
    """The names of the linear layers inside the language model's attention blocks, in their order."""
    import torch

    names: dict[str, None] = {}
    for name, module in _language_model(model).named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and any("attn" in p or "attention" in p for p in parts[:-1]):
            names.setdefault(parts[-1])
    return tuple(names)


# The config keys that give a mixture's number of experts (the language model's, in a multimodal config).
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _has_experts(info: BaseModelInfo) -> bool:
    return _config_has_experts(config_of(info))


def _config_has_experts(cfg: dict[str, Any]) -> bool:
    parts = [cfg, cfg.get("text_config")]
    return any(isinstance(p, dict) and any(isinstance(p.get(k), int) and p[k] > 0 for k in _EXPERT_KEYS) for p in parts)


def trains_experts(ref: str, targets: str | list[str] | tuple[str, ...], settings: Settings) -> bool:
    """Whether `targets` on base model `ref` put LoRA on a mixture's experts, which takes no dropout. Asked
    before a run is started or planned (profiles.fit_dropout). A dense base costs a config read (the folder, or
    the hub cache's snapshot; nothing is built, fetched or fingerprinted); a mixture, PEFT on the model built on
    the meta device, once per process. False where the base cannot be read yet (the run says why)."""
    if ref == TINY_ID:
        return False
    try:
        path = local_dir(ref, settings.home) or (_from_hub(ref)[0] if _HUB_ID.fullmatch(ref) else None)
        raw = (path / "config.json").read_bytes() if path is not None else b""
        cfg = json.loads(raw) if raw else None
        if path is None or not isinstance(cfg, dict) or not _config_has_experts(cfg):
            return False
        digest = hashlib.sha256(raw).hexdigest()
        layout = _lora_layout(str(path), digest, ref, targets if isinstance(targets, str) else tuple(targets))
    except (LunaError, OSError, ValueError, RecursionError):  # a config nested past the parser's depth
        return False
    return layout is not None and bool(layout.parameters)


def check_expert_dropout(params: Any, info: BaseModelInfo) -> None:
    """PEFT's LoRA on fused expert parameters takes no dropout, and says so only once the run loads the model,
    in its own words: a run on a mixture of experts whose targets reach the experts is refused now, naming both
    ways out. Dense models are not built for it (a config read)."""
    if params.dropout <= 0 or not _has_experts(info):
        return
    layout = lora_layout(info, params.target_modules)
    if layout is None or not layout.parameters:
        return
    attention = ",".join(layout.attention) or "q_proj,k_proj,v_proj,o_proj"
    raise UsageError(
        f"LoRA on the experts of base model {info.id!r} (a mixture of experts; targetModules "
        f"{params.target_modules!r} reach them) takes no dropout: set --dropout 0, or train attention only "
        f"(--targetModules {attention}).",
        code="lora.experts_dropout",
        # dropout first: the dashboard marks the first form field a refusal's parameters name, and that is the one
        # to change
        params={"dropout": params.dropout, "baseModel": info.id, "attention": attention},
    )


def lora_misfits(weights: Path, info: BaseModelInfo) -> list[str]:
    """The LoRA tensors in `weights` (an adapter_model.safetensors) that the base model's layers cannot take,
    one line each ("LAYER: lora_A has N inputs, the layer M"), from the file's header and the model built on
    the meta device: no weight is read. Empty when they fit, or when the header cannot be read (the file's
    own check says that)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # not a dict
    except Exception:
        return []
    layers = dict(meta_model(info).named_modules())
    out = []
    for key, shape in shapes.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None or len(shape) != 2:
            continue
        layer = layers.get(m.group(1))
        weight = getattr(layer, "weight", None)
        if layer is None or weight is None or weight.dim() != 2:
            out.append(f"{m.group(1)}: no such layer in {info.id!r}")
            continue
        # (out, in) for a Linear; GPT-2's Conv1D stores (in, out)
        width_out, width_in = weight.shape[::-1] if type(layer).__name__ == "Conv1D" else weight.shape
        if m.group(2) == "A" and shape[1] != width_in:
            out.append(f"{m.group(1)}: lora_A takes {shape[1]} inputs, the layer {width_in}")
        elif m.group(2) == "B" and shape[0] != width_out:
            out.append(f"{m.group(1)}: lora_B gives {shape[0]} outputs, the layer {width_out}")
    return out


# The layer classes the refusal lists as the model's linear layers (GPT-2 writes its own, Conv1D). The names
# come from the model built on the meta device, never quantized, so bitsandbytes' classes do not occur.
_LINEAR = {"Linear", "Conv1D"}


def check_target_modules(targets: list[str] | str, kinds: dict[str, str], base_id: str) -> None:
    """Every name in `targets` is a module of the model (PEFT's rule: the qualified name is the target or ends
    in `.target`), each module it names is one LoRA can adapt, and none is one side of tied embeddings. PEFT
    itself refuses only a list that matches nothing: a mistyped name beside good ones would be left out
    without a word, and the adapter would train fewer layers than asked."""
    if isinstance(targets, str):  # "all-linear"
        return
    linear = sorted({n.rsplit(".", 1)[-1] for n, kind in kinds.items() if kind in _LINEAR} - {"lm_head"})
    layers = f"its linear layers are {', '.join(linear)} (or use all-linear)"
    matched = {t: [n for n in kinds if n == t or n.endswith(f".{t}")] for t in targets}
    unknown = [t for t, names in matched.items() if not names]
    if unknown:
        raise UsageError(f"targetModules {unknown!r} name no module of base model {base_id!r}; {layers}.")
    if not isinstance(kinds, ModuleMap):  # a plain name → class map (a caller's own): names only
        return
    # PEFT wraps every module a name matches and refuses a block or a norm with its whole repr, after the load.
    blocks = {t: sorted({kinds[n] for n in names if n not in kinds.adaptable}) for t, names in matched.items()}
    if unfit := {t: kinds_ for t, kinds_ in blocks.items() if kinds_}:
        said = "; ".join(f"{t!r} is {', '.join(k)}" for t, k in unfit.items())
        raise UsageError(
            f"targetModules {list(unfit)!r} name modules of base model {base_id!r} that LoRA cannot adapt "
            f"({said}); {layers}."
        )
    # An adapter on one side of a shared weight trains and serves one model, but merges into another (the
    # merged weight is both sides), and PEFT cannot save both sides at once.
    if tied := [t for t, names in matched.items() if kinds.tied & set(names)]:
        raise UsageError(
            f"targetModules {tied!r} name the input embedding or output layer, which base model {base_id!r} "
            f"ties into one weight ({' and '.join(sorted(kinds.tied))}): an adapter there would merge into "
            f"another model than the one it serves; leave {'it' if len(tied) == 1 else 'them'} out ({layers})."
        )


def check_targets_of(params: Any, settings: Settings) -> None:
    """`check_target_modules` for a run's LoRA parameters on its base model, before anything runs (a list
    only: all-linear fits every model), `check_stored_quantization`, `check_expert_dropout` and
    `check_quantize_installed`."""
    check_quantize_installed(params.quantize)
    if isinstance(params.target_modules, list):
        info = resolve_base(params.base_model, settings)
        check_target_modules(params.target_modules, module_kinds(info), info.id)
    else:
        try:
            info = resolve_base(params.base_model, settings)
        except UsageError:  # all-linear fits every model: a base that is not there is said by the step that needs it
            return
    check_stored_quantization(params.quantize, info)
    check_expert_dropout(params, info)


def _installed(name: str) -> bool:
    # On sys.path itself: a process that will not quantize hides bitsandbytes from find_spec (compat.py).
    import importlib.machinery

    return importlib.machinery.PathFinder.find_spec(name) is not None


# Stored quantizations transformers undoes on load where it cannot compute in them (fp8 on a CPU or an older GPU):
# such a folder trains, gates and merges as a full-precision one.
DEQUANTIZED = {"fp8"}


def stored_quantization(info: BaseModelInfo) -> tuple[str, str | None] | None:
    """How the base's weights are stored, from config.json's `quantization_config`: (method, "4bit"/"8bit" for
    bitsandbytes, else None); None for full-precision weights (a downloaded `…-bnb-4bit` or GPTQ folder is not)."""
    quant = config_of(info).get("quantization_config")
    if not isinstance(quant, dict):
        return None
    bits = "4bit" if quant.get("load_in_4bit") else "8bit" if quant.get("load_in_8bit") else None
    # transformers reads the method case-blind, and takes a config that names none but load_in_4bit/8bit (as
    # older releases wrote it) for bitsandbytes
    method = str(quant.get("quant_method") or ("bitsandbytes" if bits else "unknown")).lower()
    return (method, bits) if method == "bitsandbytes" else (method, None)


def check_stored_quantization(quantize: str, info: BaseModelInfo) -> None:
    """A base stored quantized trains only as it is stored: a bitsandbytes folder with that `quantize` (transformers
    loads the stored one whatever is asked, so a run would record another precision than it trained in, and
    without bitsandbytes the load fails advising to install it); GPTQ, AWQ and other kinds not at all (their
    packages are not lunatrain's, and no merge could write full-precision weights from them)."""
    stored = stored_quantization(info)
    if stored is None or stored[0] in DEQUANTIZED:
        return
    method, mode = stored
    if method == "bitsandbytes" and mode is not None:
        if quantize == mode:
            return
        raise UsageError(
            f"Base model {info.id!r} is stored quantized (bitsandbytes {mode}, in its config.json): train it "
            f"with --quantize {mode}, or use its full-precision model.",
            code="base_model.stored_quantized",
            params={"baseModel": info.id, "stored": mode, "quantize": quantize},
        )
    raise UsageError(
        f"Base model {info.id!r} is stored quantized with {method}, which lunatrain does not train on: use its "
        "full-precision model (with --quantize 4bit to train it in 4 bits).",
        code="base_model.quantized_method",
        params={"baseModel": info.id, "method": method},
    )


def check_quantize_installed(quantize: str) -> None:
    """UsageError when `quantize` needs bitsandbytes and this environment has none: prepare and the trainer
    (before it queues the job, in the environment the job runs in) say it as the model load would, later."""
    if quantize != "none" and not _installed("bitsandbytes"):
        raise UsageError(f"quantize={quantize} needs bitsandbytes: pip install 'bitsandbytes>=0.50'.")


def quantization_config(quantize: str, compute_dtype: Any):  # -> transformers.BitsAndBytesConfig
    """NF4 + double quantization (QLoRA's recipe) for 4bit, LLM.int8 for 8bit."""
    from .compat import quiet_bitsandbytes

    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401

        import_transformers()
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise UsageError(f"quantize={quantize} needs bitsandbytes: pip install 'bitsandbytes>=0.50'.") from exc
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UsageError(f"quantize must be none, 4bit or 8bit, not {quantize!r}.")


# Below this size a CPU matmul is too small to gain from intra-op threads and can lose a lot to their
# synchronisation on a busy machine (measured here: a 17x64 @ 64x192 matmul, 0.1 ms on one thread, 7 ms on
# two on a busy 2-core machine). With packed flat batches the matmuls are large enough from ~1M parameters
# up: on 2 quiet cores two threads trained 1.5-1.6x faster than one at 2.9M, 7.2M and 16.9M parameters.
SMALL_MODEL_PARAMS = 1_000_000


@contextlib.contextmanager
def cpu_threads_for(model: Any, device: str):
    """Run the block with one torch thread when `model` is small and on the CPU; restore the count after."""
    import torch

    before = torch.get_num_threads()
    small = device == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def resolve_device(device: str) -> str:
    """`auto` → cuda when available, else cpu; `cuda` without a GPU is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "device 'cuda' was requested but no CUDA GPU is available; set device to cpu or auto.",
            code="device.no_cuda",
            params={"device": "cuda"},
        )
    return device


def device_info() -> dict[str, Any]:
    """What the trainer's health endpoint reports: device type and name, memory, bf16 support."""
    import torch

    info: dict[str, Any] = {"cudaAvailable": torch.cuda.is_available(), "torch": torch.__version__}
    if info["cudaAvailable"]:
        idx = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(idx)
        info |= {
            "type": "cuda",
            "name": torch.cuda.get_device_name(idx),
            "count": torch.cuda.device_count(),
            "memoryTotal": int(total),
            "memoryFree": int(free),
            "bf16": native_bf16(),
        }
    else:
        import platform

        import psutil

        vm = psutil.virtual_memory()
        info |= {
            "type": "cpu",
            "name": platform.processor() or platform.machine(),
            "count": 1,
            "threads": torch.get_num_threads(),
            "memoryTotal": int(vm.total),
            "memoryFree": int(vm.available),
            "bf16": False,  # CPU bf16 autocast is slow on most CPUs; training stays float32
        }
    return info


# --- identity hashes ------------------------------------------------------------------------------


def tokenizer_hash(tok: Any) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalizer, special tokens)."""
    backend = tok.backend_tokenizer.to_str() if getattr(tok, "backend_tokenizer", None) else repr(tok.get_vocab())
    specials = json.dumps({"eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token}, sort_keys=True)
    return hashlib.sha256((backend + "\0" + specials).encode("utf-8")).hexdigest()


def template_hash(tok: Any) -> str:
    template = (
        tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template, sort_keys=True)
    )
    return hashlib.sha256((template or "").encode("utf-8")).hexdigest()
