"""Merge an adapter into its base model: `merge_adapter(settings, "luna-adapter@v3")`.

A separate, explicit step (guide §7): the result is a plain Hugging Face model in
data/models/merged/<name>-<version>/ (safetensors + tokenizer + chat template + a model card), loadable with
`AutoModelForCausalLM.from_pretrained` and usable where PEFT is not. It carries the adapter's tokenizer
(with the chat template it was trained with) and a generation_config.json that stops on the template's
turn terminator. The merge is done in float32 and written in the base's own dtype (a bf16 base gives a bf16
model), to a temp directory that is renamed into place, then recorded on the version in the registry. The
folder is the merge's alone: merging again replaces it whole, so one holding files a merge did not write (a
.gguf converted into it, notes) is refused, not emptied.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import registry
from .compat import peft_wrapping
from .errors import Conflict, LunaError, UsageError
from .fsio import (
    abandoned_staging,
    atomic_write_json,
    check_writable,
    give_umask_modes,
    read_json,
    staging_dir,
    storage_guard,
    swapped_dir,
)
from .settings import Settings, check_name

# What a merge writes, for a folder merged before merges listed their files: the model, its tokenizer in any of
# its formats, the generation config and the merge's own record.
_MERGE_NAMES = re.compile(
    r"(config|generation_config|special_tokens_map|added_tokens|chat_template)\.json|chat_template\.jinja|"
    r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|tokenizer.*|vocab\..*|merges\.txt|.*\.model|"
    + re.escape(registry.MERGE_FILE)
)


MERGED_CARD_FILE = "README.md"  # the merged model's card, as the Hub shows it


def merged_card(ref: str, label: str, base_id: str, entry: dict[str, Any], adapter_dir: Path, *, forced: bool) -> str:
    """The merged model's card: what it was made of (the adapter, the base, the gate's verdict, the training
    run from the version's report), and how to load it without PEFT or lunatrain. A report that cannot be read
    leaves the training table out; the merge is no less whole for it."""
    from .train import card_table, yaml_string

    gate = entry.get("gate") or {}
    verdict = gate.get("status") or ("passed" if gate.get("passed") else "failed" if gate else "not run")
    reasons = [str(r) for r in gate.get("reasons") or []]
    verdict += f" ({'; '.join(reasons)})" if reasons and verdict != "passed" else ""
    stale = entry.get("stale")
    stale_note = (
        f" The version is stale ({stale.get('reason') or 'trained on content deleted since'}): this model holds "
        "that content too."
        if isinstance(stale, dict)
        else ""
    )
    try:
        report = read_json(adapter_dir / registry.REPORT_FILE)
        table = card_table(report) + "\n"
    except (LunaError, KeyError, TypeError, ValueError, AttributeError):
        table = ""
    force_note = (
        f" It was merged with --force into another build of `{base_id}` than the one it was trained on "
        f"(`{registry.MERGE_FILE}` names both)."
        if forced
        else ""
    )
    return (
        f"---\nbase_model: {yaml_string(base_id)}\nlibrary_name: transformers\ntags:\n- lunatrain\n- lora\n"
        "- merge\n---\n\n"
        f"# {label}\n\n"
        f"`{ref}`, a LoRA adapter trained by lunatrain, merged into `{base_id}`.{force_note} "
        f"The version's eval gate: {verdict}.{stale_note}\n\n"
        + table
        + "Load it with transformers alone: `AutoModelForCausalLM.from_pretrained(THIS_FOLDER)` and "
        "`AutoTokenizer.from_pretrained(THIS_FOLDER)`; the tokenizer carries the chat template the adapter was "
        "trained with, and the generation config stops at the end of an answer. What was merged, into which "
        f"build of the base, is in `{registry.MERGE_FILE}`.\n"
    )


@dataclass
class MergeResult:
    name: str
    version: str
    path: Path  # the merged model directory
    base_model: str
    replaced: bool  # an earlier merge of the same version was replaced
    gate: dict[str, Any] | None = None  # the version's eval gate record (a refused one may still be merged)
    stale: dict[str, Any] | None = None  # its mark when trained on content deleted since (the merge holds it too)


def merge_adapter(settings: Settings, ref: str, *, force: bool = False) -> MergeResult:
    """Merge NAME@VERSION (or an alias: NAME@latest, NAME@active) into its base model.

    Refuses when the base model found now is not the one the adapter was trained on (fingerprints differ),
    unless `force`."""
    from .startup import import_training_stack

    import_training_stack()  # in a command's own process: at the imports' least cost (startup.py)
    import torch
    from peft import PeftModel

    from .models import DEQUANTIZED, load_adapter_tokenizer, load_model, stored_quantization, turn_terminator
    from .templates import write_generation_config

    name, version = registry.parse_ref(ref)
    if not version:
        _check_active(settings, name)
    entry = registry.get_version(settings, name, version or "active")
    if entry.get("replaced"):
        raise Conflict(f"{name}@{entry['version']} revision {entry.get('revision')} was replaced and is gone.")
    trained_on = entry["baseModel"]
    base = registry.trained_base(settings, entry, "merge it")
    if (stored := stored_quantization(base)) and stored[0] not in DEQUANTIZED:
        # merge_and_unload would write the update into quantized layers, which no save can turn back into weights
        raise UsageError(
            f"Base model {base.id!r} is stored quantized ({' '.join(p for p in stored if p)}): a merge needs "
            "full-precision weights; train on the full-precision model (--quantize 4bit trains it as QLoRA) to "
            "merge, or serve this adapter as it is.",
            code="merge.quantized_base",
            params={"baseModel": base.id, "method": stored[0]},
        )
    forced = base.fingerprint != trained_on["fingerprint"]
    if forced and not force:
        raise Conflict(
            f"Base model {trained_on['id']!r} has changed since {name}@{entry['version']} was trained "
            "(fingerprints differ); retrain, or pass --force to merge anyway."
        )
    adapter_dir = registry.readable_dir(settings, entry)  # before anything is written
    label = check_name(f"{name}-{entry['version']}", "merged model name")
    target = settings.merged_dir / label
    # The model goes to data/models/merged and is recorded in the registry: storage that cannot take either
    # is said before the merge, not as an OSError (or a merged model the registry never heard of) after it.
    check_writable([target.parent, settings.reports_training_dir], f"merge {name}@{entry['version']}")
    _check_target(settings, target)
    replaced = (target / registry.MERGE_FILE).is_file()  # an empty folder in its place is no earlier merge
    if replaced and not force:
        _check_dependents(settings, target, f"{name}@{entry['version']}", entry.get("revision"), base.fingerprint)
    # What a killed merge left half-written (a whole model's size) goes first: the disk it fills is the one
    # this merge writes to.
    for leftover, _ in abandoned_staging(target.parent):
        shutil.rmtree(leftover, ignore_errors=True)
    # the adapter's own tokenizer (the template it was trained with, any markers added for it), read first:
    # damaged files are said before minutes of merging, not after
    tokenizer = load_adapter_tokenizer(adapter_dir, base, settings)
    tmp = staging_dir(target.parent, label)
    try:
        model = load_model(base, settings, "cpu", torch.float32)
        with peft_wrapping(), registry.loading(settings, adapter_dir):
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        merged = model.merge_and_unload()
        merged.config.use_cache = True  # the merged model is for inference
        dtype = _stored_dtype(Path(base.path))
        if dtype in ("bfloat16", "float16"):  # merged in float32 for accuracy, stored as the base was
            merged = merged.to(getattr(torch, dtype))
        # A disk filling up while the model is written is one sentence; the staging folder goes (finally), so
        # an earlier merge of this version and its registry record stay as they were.
        with storage_guard(f"the merged model {label}"):
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            write_generation_config(tmp, base.path, turn_terminator(tokenizer, base), tokenizer)
            card = merged_card(f"{name}@{entry['version']}", label, base.id, entry, adapter_dir, forced=forced)
            (tmp / MERGED_CARD_FILE).write_text(card, encoding="utf-8")
            written = sorted([p.name for p in tmp.iterdir()] + [registry.MERGE_FILE])
            atomic_write_json(
                tmp / registry.MERGE_FILE,
                {
                    "adapter": f"{name}@{entry['version']}",
                    "dtype": str(merged.dtype).removeprefix("torch."),
                    "files": written,  # what merging again may replace (`_check_target`)
                    "revision": entry.get("revision"),
                    # the base these weights were merged into; with --force, the one trained on differs
                    "baseModel": base.record(),
                    **({"trainedOn": trained_on, "forced": True} if forced else {}),
                    "adapterPath": entry["path"],
                    "created": registry.now(),
                },
            )
            give_umask_modes(tmp)  # safetensors wrote the weights 0600
        rel = str(target.relative_to(settings.home))
        merged_info = {"path": rel, "at": registry.now()} | ({"forced": True} if forced else {})
        # The merge is in place once the registry records it: a record that fails (a registry file that cannot
        # be replaced) puts back what was there, so no folder is one no listing knows of, and an earlier merge's
        # record (of another revision, or unforced) never describes the new one.
        with storage_guard(f"the merged model {label}"), swapped_dir(tmp, target):
            registry.annotate(settings, name, entry["version"], "merged", merged_info, revision=entry.get("revision"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the base merged into, as found now (a folder moved and configured at its new place: that place)
    return MergeResult(name, entry["version"], target, base.id, replaced, entry.get("gate"), entry.get("stale"))


def _check_active(settings: Settings, name: str) -> None:
    """NotFound when a bare name has no version to merge: a bare name is the version served now on the
    configured base, never the latest (which may be one the gate refused). Says where it is active instead;
    on an earlier build of the configured base (changed in place since), with the --force that merging takes."""
    configured = registry.configured_base(settings)
    if not registry.get_version(settings, name) or registry.active_version(settings, name, configured.fingerprint):
        return
    elsewhere = []
    for a in registry.list_active(settings):
        if a["name"] != name:
            continue
        ref = f"{name}@{a['version']}"
        if registry.same_base_id(settings, a["baseModel"], configured.id):
            elsewhere.append(
                f"on an earlier build of base model {configured.id!r}, changed since, it is {a['version']}: "
                f"`lunatrain merge --adapter {ref} --force` merges it into the base as it is now, or retrain it"
            )
        else:
            elsewhere.append(
                f"on base model {a['baseModel']!r} it is {a['version']}: `lunatrain merge --adapter {ref}`"
            )
    raise UsageError(  # the data root's state refuses the request: exit 2, as `adapters deactivate` says it
        f"Adapter {name!r} has no active version on base model {configured.id!r} to merge"
        + (f" ({'; '.join(elsewhere)})" if elsewhere else "")
        + f"; name the version: `lunatrain merge --adapter {name}@VERSION` (`lunatrain adapters list` shows "
        "its versions)."
    )


def _check_dependents(settings: Settings, target: Path, ref: str, revision: Any, base: str) -> None:
    """Conflict when merging `ref` again would give `target` other weights (another revision of an overwrite
    slot, or another build of the base) while versions trained on that folder as their base are registered:
    they could no longer be served, activated or merged, and the weights they were trained on would be gone. A
    merge that writes the same weights again (a numbered version into the same base) replaces nothing."""
    try:
        record = read_json(target / registry.MERGE_FILE)
    except LunaError:  # a damaged record: what it merged is unknown, so the weights may well differ
        record = None
    earlier = record if isinstance(record, dict) else {}
    merged_into = earlier.get("baseModel")
    base_then = merged_into.get("fingerprint") if isinstance(merged_into, dict) else None
    if earlier.get("adapter") == ref and earlier.get("revision") == revision and base_then == base:
        return
    from .models import local_dir, resolve_base

    here = target.resolve()
    try:  # a version trained on an earlier build of the folder can no longer be served: no merge takes it away
        now = resolve_base(str(target), settings).fingerprint
    except LunaError:
        now = None
    dependents = [
        f"{name}@{entry['version']}"
        for name, adapter in registry.load(settings)["adapters"].items()
        for entry in adapter.get("versions", [])
        if not entry.get("replaced")
        and local_dir(str((entry.get("baseModel") or {}).get("id") or ""), settings.home) == here
        and (now is None or (entry.get("baseModel") or {}).get("fingerprint") == now)
    ]
    if dependents:
        more = f" and {len(dependents) - 5} more" if len(dependents) > 5 else ""
        raise Conflict(
            f"{settings.shown(target)} is the base model of {', '.join(dependents[:5])}{more}: merging {ref} again "
            "gives it other weights, and those versions could no longer be served, activated or merged; merge "
            "with --force to replace it anyway, or retrain them afterwards.",
            code="merge.base_of_others",
            params={"target": settings.shown(target), "adapters": dependents[:5], "count": len(dependents)},
        )


def _check_target(settings: Settings, target: Path) -> None:
    """Conflict, before anything is merged or written, when `target` is there and is not only a merge: a
    merge replaces its folder whole, and what else lies in it (a .gguf converted into it, notes) would go."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    where = settings.shown(target)
    marker = target / registry.MERGE_FILE
    if not marker.is_file():
        raise Conflict(
            f"{where} is not a merge of lunatrain (no {registry.MERGE_FILE}); move it away or delete it, then merge again."
        )
    try:
        record = read_json(marker)
    except LunaError:
        record = {}  # a damaged record: judge the files by their names
    listed = record.get("files") if isinstance(record, dict) else None
    written = set(listed) if isinstance(listed, list) else None
    foreign = sorted(
        p.name
        for p in target.iterdir()
        if (p.name not in written if written is not None else not _MERGE_NAMES.fullmatch(p.name))
    )
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise Conflict(
            f"{where} holds files a merge did not write ({', '.join(foreign[:5])}{more}), and merging again "
            "replaces the whole folder; move them away first."
        )


def _stored_dtype(path: Path) -> str | None:
    """The dtype the base's config.json says its weights are stored in (`dtype`, before transformers 5
    `torch_dtype`); where it names none (older checkpoints), the floating dtype that holds most of the first
    weights file's bytes, from its header (a bfloat16 model keeps a few norms in float32); else None."""
    try:
        config = read_json(path / "config.json")
    except LunaError:
        config = None
    dtype = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    if isinstance(dtype, str):
        return dtype
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return None
    problem, header = registry.weights_header(weights[0])
    held: dict[str, int] = {}
    for key, t in header.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if key != "__metadata__" and t.get("dtype") in _SAFETENSORS_FLOATS and isinstance(offsets, list) and offsets:
            held[t["dtype"]] = held.get(t["dtype"], 0) + offsets[-1] - offsets[0]
    return _SAFETENSORS_FLOATS[max(held, key=held.__getitem__)] if problem is None and held else None


# safetensors' names of the floating dtypes a merge keeps
_SAFETENSORS_FLOATS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
