"""The memory plan: will a LoRA job fit this device, and with which options? `check_fits(settings, params,
device)` answers before a job starts (prepare, job submit, the training loop's validation), so a job that
cannot fit is refused with one sentence naming the option that would make it fit, instead of running
until it dies out of memory.

The estimate works from the base model's config.json alone (no weights are read) and counts, in bytes:

- `weights`: every parameter in the compute dtype (`models.compute_dtype`: bfloat16 on a GPU that has it
  natively, else float32), except the decoder's linear layers under `quantize` (NF4: ~0.52 bytes per weight
  with double-quantized scales; int8: ~1);
- `lora`: LoRA parameters in float32 with their gradients and two AdamW moments (16 bytes each);
- `activations`: what autograd keeps per token and layer for a micro-batch of `tokens`: the inputs of
  norms, projections, attention and MLP, plus one copy of each LoRA input where dropout is on. With
  gradient checkpointing only each layer's input is kept, and one layer's worth is rebuilt in backward;
- `logits`: the cross-entropy at the supervised positions: their logits, float32 log-softmax and gradients
  for all of them (plain path) or for one chunk (`loss.py`'s chunked path);
- `allocator`: on CPU, what the C allocator keeps of the memory a step frees (`CPU_ALLOCATOR_SLACK`):
  the resident size is what the system runs out of;
- `overhead`: the runtime (CPU: the Python process with torch and transformers; CUDA: context, kernels'
  workspace, allocator slack).

The constants are checked against measured peaks by `bench/memory.py` (bench/results/memory.md).
`gradientCheckpointing=auto` turns checkpointing on only when the job would not fit without it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from .errors import CheckFailed, LunaError, UsageError
from .loss import chunk_tokens
from .params import LoraParams
from .settings import Settings

GIB = 1 << 30
# What a job may plan to use of the memory free when it starts: the rest is headroom for the estimate's
# error, other processes (CPU) and allocator fragmentation (CUDA).
BUDGET_FRACTION = {"cpu": 0.85, "cuda": 0.90}
# The process itself: torch + transformers + PEFT + bitsandbytes imported (measured ~470 MiB RSS on CPU),
# tokenizer and data; on CUDA the context, cuBLAS workspaces and the allocator's reserve.
OVERHEAD = {"cpu": 640 << 20, "cuda": 1200 << 20}
# On CPU, glibc's malloc keeps most blocks a training step frees in its heap: tensors under its dynamic
# mmap threshold, which rises up to 32 MiB; larger ones are unmapped when freed. So the process's resident
# size grows by a share of all the per-layer tensors under 32 MiB the step ever allocates, with or without
# checkpointing. Measured on the 20M model (bench/memory.py): 0.65-0.95 of them.
CPU_ALLOCATOR_SLACK = 0.8
MMAP_CEILING = 32 << 20
# Bytes per weight of a quantized linear layer: NF4 packs two per byte plus a float scale per 64 weights,
# itself quantized to 8 bits per 256 scales (double quantization); int8 keeps a float scale per row.
QUANT_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
# Architectures whose logits the chunked loss does not reproduce (loss.lean_loss_check finds them at run
# time; here the config keys tell, so the plan matches what the run will do).
PLAIN_LOSS_KEYS = ("logits_scaling", "logit_scale")


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder-only transformer that decide its memory."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    chunked_loss: bool = True
    varlen: bool = True  # per-sample attention (kernels.py); else a dense block mask per row
    experts_per_token: int = 1  # a mixture of experts: the MLPs each token runs through
    # (all parameters, those of linear layers a quantization can take), counted on the model built on the meta
    # device (`model_shape`); None: from the dimensions above, one dense MLP a layer
    counted: tuple[int, int] | None = None
    # (targetModules, LoRA parameters per unit of rank) as PEFT wraps the model built on the meta device for them
    # (`models.lora_layout`: a mixture's experts too); None, or a job of other targets: from `module_dims`
    lora_counted: tuple[tuple[str, ...], int] | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str) -> Shape:
        inner = cfg.get("text_config")  # multimodal configs keep the language model's shape inside
        if inner is not None and not isinstance(inner, dict):
            raise _not_a_decoder(name, f"text_config is {type(inner).__name__}, not an object")
        cfg = inner or cfg
        hidden = _dimension(cfg, name, "hidden_size", "n_embd", "d_model")
        heads = _dimension(cfg, name, "num_attention_heads", "n_head")
        is_moe = _dimension(cfg, name, "num_local_experts", "num_experts", default=0, least=0)
        return cls(
            name=name,
            hidden=hidden,
            layers=_dimension(cfg, name, "num_hidden_layers", "n_layer"),
            heads=heads,
            kv_heads=_dimension(cfg, name, "num_key_value_heads", default=heads),
            # 0 is "derive it" in some configs (transformers' glm5_next writes it so), as null is in others
            head_dim=_dimension(cfg, name, "head_dim", default=0, least=0) or max(hidden // heads, 1),
            intermediate=_dimension(cfg, name, "intermediate_size", "n_inner", default=4 * hidden),
            vocab=_dimension(cfg, name, "vocab_size"),
            tied=bool(cfg.get("tie_word_embeddings", True)),
            chunked_loss=not any(cfg.get(k) not in (None, 1, 1.0) for k in PLAIN_LOSS_KEYS),
            varlen=cfg.get("attn_logit_softcapping") is None,
            experts_per_token=(
                _dimension(cfg, name, "num_experts_per_tok", "num_experts_per_token", default=1) if is_moe else 1
            ),
        )

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        if self.counted:
            return self.counted[1]
        return self.layers * sum(a * b for a, b in self.module_dims().values())

    @property
    def params(self) -> int:
        if self.counted:
            return self.counted[0]
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.linear_params + (2 * self.layers + 1) * self.hidden


# Larger than any model's dimension (a vocabulary of 2 billion tokens): a config beyond it is damaged, and the
# plan's products of dimensions stay far inside a float.
MAX_DIMENSION = 2**31 - 1


def _dimension(cfg: dict[str, Any], name: str, *keys: str, default: int | None = None, least: int = 1) -> int:
    """The first of `keys` the config sets (to anything but null) as a whole number from `least` to
    MAX_DIMENSION; `default` when it sets none of them. A key set to 0 is a bad value, not an absent one."""
    key = next((k for k in keys if cfg.get(k) is not None), None)
    if key is None:
        if default is None:
            raise _not_a_decoder(name, f"it sets none of {', '.join(keys)}" if len(keys) > 1 else f"no {keys[0]}")
        return default
    value = cfg[key]
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole or not least <= int(value) <= MAX_DIMENSION:
        raise _not_a_decoder(
            name, f"{key} is {json.dumps(value)[:40]}, not a whole number from {least} to {MAX_DIMENSION}"
        )
    return int(value)


def _not_a_decoder(name: str, why: str) -> UsageError:
    return UsageError(f"The config of base model {name!r} does not describe a decoder the memory plan knows: {why}.")


@dataclass(frozen=True)
class Job:
    """What a job asks of the device, besides the model: the options the estimate depends on."""

    device: str  # cpu | cuda
    tokens: int  # tokens of the largest micro-batch
    supervised: int  # supervised positions in it
    rows: int  # rows of that micro-batch when laid out without per-sample attention
    rank: int
    targets: tuple[str, ...]
    dropout: bool
    quantize: str
    checkpointing: bool
    bf16: bool = True  # on CUDA: the device computes bfloat16 natively (models.compute_dtype)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.device == "cuda" and self.bf16 else 4  # bfloat16 where the GPU has it, else float32


def _targeted(shape: Shape, job: Job) -> dict[str, tuple[int, int]]:
    dims = shape.module_dims()
    if job.targets == ("all-linear",):
        return dims
    named = {k: v for k, v in dims.items() if any(t == k or k.endswith(t) for t in job.targets)}
    return named or dims  # modules the plan does not know by name: count as all-linear (an upper bound)


def estimate(shape: Shape, job: Job) -> dict[str, int]:
    """Peak bytes by component (see the module docstring) and their `total`."""
    b = job.compute_bytes
    h, i, kv = shape.hidden, shape.intermediate, 2 * shape.kv_heads * shape.head_dim
    targeted = _targeted(shape, job)
    if job.quantize == "none":
        weights = shape.params * b
    else:
        weights = int(shape.linear_params * QUANT_BYTES[job.quantize]) + (shape.params - shape.linear_params) * b
    counted = shape.lora_counted
    per_rank = counted[1] if counted and counted[0] == job.targets else None
    per_rank = per_rank or shape.layers * sum(a + c for a, c in targeted.values())
    lora = 16 * job.rank * per_rank  # float32 weights, their gradients and Adam's two moments
    # per token and layer, in elements: norms 2h each (input and normalized), q/k/v (h + kv), attention
    # output and o_proj input (2h), MLP input (h), gate, up, activation and product (4i)
    dropped = [d[0] for d in targeted.values()] if job.dropout else []  # PEFT keeps each dropped-out input
    k = shape.experts_per_token  # each of a token's experts keeps its own MLP activations
    widths = [(h, 9 + sum(1 for w in dropped if w == h)), (i, k * (4 + sum(1 for w in dropped if w == i)))]
    per_layer = sum(w * n for w, n in widths) + kv + 2 * job.rank * len(targeted)  # + LoRA A outputs
    every_layer = job.tokens * b * shape.layers * per_layer
    activations = job.tokens * b * (shape.layers * h + per_layer) if job.checkpointing else every_layer
    allocator = 0
    if job.device == "cpu":  # glibc keeps the step's freed blocks below its mmap ceiling (CPU_ALLOCATOR_SLACK)
        kept = sum(w * n for w, n in widths if job.tokens * w * b < MMAP_CEILING)
        allocator = int(CPU_ALLOCATOR_SLACK * job.tokens * b * shape.layers * kept)
    if not shape.varlen:  # a dense block mask per row, and eager attention's probabilities per layer
        row = -(-job.tokens // job.rows)
        activations += job.rows * row * row * (1 + (1 if job.checkpointing else shape.layers) * shape.heads * b)
    per_logit = (4 if b == 4 else b + 4) + 8  # logits (+ float32 copy), log-softmax and its gradient
    if shape.chunked_loss:
        logits = min(job.supervised, chunk_tokens(shape.vocab)) * shape.vocab * per_logit + 2 * job.supervised * h * b
    else:
        logits = job.supervised * shape.vocab * per_logit
    parts = {
        "weights": int(weights),
        "lora": lora,
        "activations": activations,
        "logits": logits,
        "allocator": allocator,
        "overhead": OVERHEAD[job.device],
    }
    if job.device == "cuda":
        parts["overhead"] += int(0.05 * sum(parts.values()))  # allocator fragmentation
    return parts | {"total": sum(parts.values())}


# --- the plan for one job ---------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    base_model: str
    device: str
    free: int  # bytes free on the device when planned
    budget: int  # what the job may use: BUDGET_FRACTION of free
    fits: bool
    checkpointing: bool  # the decision: requested, or auto and needed
    checkpointing_reason: str
    quantize: str
    loss: str  # chunked | plain
    tokens: int
    supervised: int
    parts: dict[str, int] = field(default_factory=dict)
    total: int = 0
    suggestion: str | None = None  # the option that would make a job fit that does not
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            "baseModel": d["base_model"],
            "device": d["device"],
            "free": d["free"],
            "budget": d["budget"],
            "fits": d["fits"],
            "gradientCheckpointing": d["checkpointing"],
            "gradientCheckpointingReason": d["checkpointing_reason"],
            "quantize": d["quantize"],
            "loss": d["loss"],
            "tokensPerMicroBatch": d["tokens"],
            "supervisedPerMicroBatch": d["supervised"],
            "bytes": d["parts"],
            "total": d["total"],
            "suggestion": d["suggestion"],
            "message": d["message"],
        }

    def coded(self) -> tuple[str, dict[str, Any]]:
        """The check's code and params, for the dashboard to say the message in its own language."""
        if self.fits:
            code = "check.memory_plan.fits"
        else:
            code = "check.memory_plan.too_big" if self.suggestion else "check.memory_plan.too_big_any"
        gib = lambda n: round(n / GIB, 2)
        params = {"needGiB": gib(self.total), "budgetGiB": gib(self.budget) if self.budget else None}
        return code, params | ({"suggestion": self.suggestion} if self.suggestion else {})


def plan(
    shape: Shape,
    params: LoraParams,
    device: dict[str, Any],
    *,
    batch: MicroBatch | None = None,
) -> MemoryPlan:
    """The plan for `params` on `device` (a `models.device_info()`-shaped dict: type, memoryFree) without
    raising; `batch`: the largest micro-batch of the job's data (`largest_batch`), else the worst case
    batchSize x maxSeqLength, all supervised."""
    kind = device["type"]
    free = int(device.get("memoryFree") or 0)
    budget = usable(free, kind)
    worst = params.batch_size * params.max_seq_length
    tokens, supervised, rows = batch or (worst, worst, 1 if params.packing and shape.varlen else params.batch_size)
    job = Job(
        device=kind,
        tokens=tokens,
        supervised=supervised,
        rows=rows,
        rank=params.rank,
        targets=(params.target_modules,) if isinstance(params.target_modules, str) else tuple(params.target_modules),
        dropout=params.dropout > 0,
        quantize=params.quantize,
        checkpointing=False,
        bf16=bool(device.get("bf16", True)),
    )
    switch = params.gradient_checkpointing
    tries = [False, True] if switch == "auto" else [switch == "true"]
    for ck in tries:
        parts = estimate(shape, replace(job, checkpointing=ck))
        if parts["total"] <= budget:
            break
    fits = parts["total"] <= budget
    reason = {"true": "requested", "false": "off as requested"}.get(switch) or (
        "needed to fit" if ck else "not needed: the job fits without it"
    )
    result = MemoryPlan(
        base_model=shape.name,
        device=kind,
        free=free,
        budget=budget,
        fits=fits,
        checkpointing=ck,
        checkpointing_reason=reason,
        quantize=params.quantize,
        loss="chunked" if shape.chunked_loss else "plain",
        tokens=tokens,
        supervised=supervised,
        parts={k: v for k, v in parts.items() if k != "total"},
        total=parts["total"],
    )
    need, have = _gib(parts["total"]), _gib(budget)
    if fits:
        result.message = (
            f"{shape.name} fits on {kind}: about {need} of {have} usable"
            f"{', with gradient checkpointing' if ck else ''}."
        )
        return result
    result.suggestion = _suggest(shape, params, job, budget)
    fix = (
        f"it would fit with {result.suggestion}"
        if result.suggestion
        else "not even 4-bit weights, one sample per micro-batch and maxSeqLength 256 would fit; use a smaller "
        "base model or a device with more memory"
    )
    result.message = f"This job needs about {need} on {kind} but only {have} is usable ({_gib(free)} free); {fix}."
    return result


def _suggest(shape: Shape, params: LoraParams, job: Job, budget: int) -> str | None:
    """The options that make the job fit, as flags: one change where one suffices (checkpointing when it
    was off, 4-bit weights, a smaller batch with more accumulation, a shorter maxSeqLength), else these
    combined in that order; None when even all of them together do not fit."""
    ck = params.gradient_checkpointing != "false"

    def fits(change: dict[str, Any]) -> bool:
        tokens = min(job.tokens, change.get("batch", params.batch_size) * change.get("length", params.max_seq_length))
        trial = replace(
            job,
            tokens=tokens,
            supervised=min(job.supervised, tokens),
            rows=min(job.rows, change.get("batch", params.batch_size)),
            checkpointing=change.get("checkpointing", ck),
            quantize=change.get("quantize", job.quantize),
        )
        return estimate(shape, trial)["total"] <= budget

    steps: list[dict[str, Any]] = []
    if not ck:
        steps.append({"checkpointing": True})
    if params.quantize != "4bit":
        steps.append({"quantize": "4bit"})
    steps += [{"batch": b} for b in range(params.batch_size - 1, 0, -1)]
    length = params.max_seq_length // 2
    while length >= 256:
        steps.append({"length": length})
        length //= 2
    for change in steps:  # one change
        if fits(change):
            return _flags(change, params)
    combined: dict[str, Any] = {}
    for change in steps:  # cumulative, then without the parts it turns out not to need
        combined |= change
        if fits(combined):
            for key in list(combined):
                lighter = {k: v for k, v in combined.items() if k != key}
                if fits(lighter):
                    combined = lighter
            return _flags(combined, params)
    return None


def _flags(change: dict[str, Any], params: LoraParams) -> str:
    flags = []
    if change.get("checkpointing"):
        flags.append("--gradientCheckpointing=true")
    if "quantize" in change:
        flags.append(f"--quantize={change['quantize']}")
    if "batch" in change:  # the same samples per optimizer step, in more micro-batches
        keep = -(-params.batch_size * params.gradient_accumulation // change["batch"])
        flags.append(f"--batchSize={change['batch']} --gradientAccumulation={keep}")
    if "length" in change:
        flags.append(f"--maxSeqLength={change['length']}")
    return " ".join(flags)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# --- entry points -------------------------------------------------------------------------------------


def check_fits(
    settings: Settings,
    params: LoraParams,
    device: dict[str, Any] | None = None,
    *,
    base: Any = None,
    samples: list[Any] | None = None,
    least: bool = False,
) -> MemoryPlan:
    """The plan for this job; raises CheckFailed (one sentence, naming the option that would make it fit)
    when it cannot fit: valid options on a device too small, a failed check as prepare reports it.
    `device`: a `models.device_info()` dict for the device the job will use (default: the one `params.device`
    resolves to); `base`: a resolved `models.BaseModelInfo` when the caller has one; `samples`: the job's
    tokenized train samples, whose largest micro-batch is planned (else the worst case). `least`: what any
    data needs at the least (a micro-batch of one token), for a caller without the data: the trainer at
    submit refuses only what no data fits, as the worst case would refuse jobs whose data fits easily (a
    batch of 1024 x 131072 tokens the data never fills); the run plans its data before it loads the model."""
    from .models import resolve_base, resolve_device

    if device is None or params.device not in ("auto", device.get("type")):  # e.g. a CPU job on a GPU machine
        device = device_memory(resolve_device(params.device))
    info = base or resolve_base(params.base_model, settings)
    shape = model_shape(info, settings, params.target_modules)
    batch = MicroBatch(1, 1, 1) if least else largest_batch(samples, params, shape) if samples else None
    result = plan(shape, params, device, batch=batch)
    if not result.fits:
        code, said = result.coded()
        raise CheckFailed(result.message, details=[result.to_dict()], params={"check": code} | said)
    return result


def model_shape(info: Any, settings: Settings | None = None, targets: Any = "all-linear") -> Shape:
    """The Shape of a resolved base model, from its config.json, for LoRA on `targets` (a job's targetModules).
    With `settings`, what building the model says is kept in (and read from) the data root's cache
    (`_built_cached`)."""
    try:
        raw = (Path(info.path) / "config.json").read_bytes()
        cfg = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"The config.json of base model {info.id!r} cannot be read: {exc}") from exc
    if not isinstance(cfg, dict):
        raise UsageError(f"The config.json of base model {info.id!r} is not a JSON object.")
    shape = Shape.from_config(_with_text_defaults(info, cfg, hashlib.sha256(raw).hexdigest()), info.id)
    targets = targets if isinstance(targets, str) else list(targets)
    built = _built(info, targets) if settings is None else _built_cached(info, raw, targets, settings)
    if built is None:
        return shape
    lora = None if built[2] is None else ((targets,) if isinstance(targets, str) else tuple(targets), built[2])
    return replace(shape, varlen=built[0], counted=built[1], lora_counted=lora)


_TEXT_KEYS = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size")


def _with_text_defaults(info: Any, cfg: dict[str, Any], digest: str) -> dict[str, Any]:
    """`cfg` with its `text_config` whole: transformers writes a multimodal model's language config without
    the values that equal its defaults (Gemma 3's 4b/12b/27b leave out the heads and the vocabulary), so
    they are read from transformers' own config class; `cfg` as it is where nothing is missing or
    transformers cannot read it (the plan then names what it lacks). `digest`: of the config's bytes."""
    text = cfg.get("text_config")
    if not isinstance(text, dict) or all(k in text for k in _TEXT_KEYS):
        return cfg
    whole = _text_defaults(str(info.path), digest)
    return cfg if whole is None else cfg | {"text_config": whole | text}


@functools.lru_cache(maxsize=32)
def _text_defaults(path: str, digest: str) -> dict[str, Any] | None:
    """The whole text config transformers reads from the folder (importing it costs seconds: once per process
    and config, `digest` being its bytes'); None where transformers cannot read it."""
    try:
        from .compat import import_transformers

        import_transformers()
        from transformers import AutoConfig

        loaded = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return loaded.get_text_config().to_dict()
    except Exception:  # an architecture this transformers does not know, a config it refuses
        return None


def _built_cached(info: Any, config: bytes, targets: Any, settings: Settings) -> Built | None:
    """`_built`, kept in data/cache/shapes by everything its answer depends on: the config.json's bytes, the
    installed transformers and torch, and lunatrain's code. Building the model needs torch and transformers,
    3-4 CPU-seconds of imports in a process that has neither: the trainer admitting a job that prepare
    planned a moment before, the API's preflight. A cache file that cannot be read or written is built again."""
    from importlib.metadata import version

    from .fsio import atomic_write_text
    from .service.spawn import code_signature

    ident = [hashlib.sha256(config).hexdigest(), version("transformers"), version("torch"), code_signature(), targets]
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
    path = settings.cache_dir / "shapes" / f"{key}.json"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["ident"] == ident:
            built = kept["built"]
            if built is None:
                return None
            per_rank = None if built[2] is None else int(built[2])
            return bool(built[0]), (int(built[1][0]), int(built[1][1])), per_rank
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    built = _built(info, targets)
    # A read-only data root or a full disk plans as well, only not faster (fsio says its OSErrors as ours).
    with contextlib.suppress(OSError, LunaError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"ident": ident, "built": built}))
        _prune_shapes(path.parent, ident[1:4])
    return built


def _prune_shapes(folder: Path, installation: list[str]) -> None:
    """Remove what an earlier installation (another transformers, torch or lunatrain) kept: each update would
    leave one file per model behind for good."""
    for kept in folder.glob("*.json"):
        try:
            if json.loads(kept.read_text(encoding="utf-8"))["ident"][1:4] != installation:
                kept.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                kept.unlink()


# What building a model on the meta device says (`_built`): per-sample attention, (all parameters, those of linear
# layers), LoRA parameters per unit of rank for the targets (None where PEFT could not wrap it).
Built = tuple[bool, tuple[int, int], int | None]


def _built(info: Any, targets: Any = "all-linear") -> Built | None:
    """What the model built from its config on the meta device says (`models.meta_model`: no weights read or
    allocated, never the folder's own code): whether training will run the per-sample attention, by the rule
    training applies (`kernels.varlen_supported`: architecture, attention sinks, logit caps, softcapping); and
    its parameters, all of them and those of its linear layers (what bitsandbytes quantizes: experts that
    transformers keeps as fused parameters stay unquantized); and the LoRA parameters per unit of rank PEFT
    puts on it for `targets` (`models.lora_layout`). None where transformers cannot build it: then
    `Shape.from_config`'s estimate from the config stands."""
    import torch

    from .kernels import varlen_supported
    from .models import lora_layout_of, meta_model

    try:
        model = meta_model(info)
    except UsageError:
        return None
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    varlen, counted = varlen_supported(model), (sum(p.numel() for p in model.parameters()), linear)
    layout = lora_layout_of(model, targets)  # last: PEFT wraps the model in place
    return varlen, counted, layout and layout.per_rank


def device_memory(kind: str) -> dict[str, Any]:
    """Type and free memory of the device a job runs on (`models.device_info()` describes the default one)."""
    from .models import device_info

    info = device_info()
    if info["type"] == kind:
        return info
    import psutil  # a CPU job on a machine with a GPU

    return {
        "type": "cpu",
        "memoryFree": int(psutil.virtual_memory().available),
        "memoryTotal": int(psutil.virtual_memory().total),
    }


class MicroBatch(NamedTuple):
    """The largest micro-batch of a job's data as training lays it out."""

    tokens: int  # positions the model runs, padding included
    supervised: int  # supervised positions in it
    rows: int  # its rows (1: one flat row of per-sample attention)


def largest_batch(samples: list[Any], params: LoraParams, shape: Shape) -> MicroBatch:
    """A micro-batch of `params.batch_size` of these samples that none exceeds, laid out as training lays it
    out (`train.batch_of`): with packing on a model with per-sample attention one flat row, the batchSize
    longest samples' tokens; otherwise rows padded to the widest. Without packing a row per sample: the batch
    that holds the longest sample is batchSize x its length. With packing, first-fit rows of maxSeqLength:
    batches are drawn at random and first fit is not monotone (shorter samples may take more room), so a bound
    for any of them: any two first-fit rows hold more than a row's capacity together, so S tokens take at most
    2S/C + 1 rows, each at most C wide."""
    longest = sorted((len(s) for s in samples), reverse=True)[: params.batch_size]
    supervised = sum(sorted((s.n_supervised for s in samples), reverse=True)[: params.batch_size])
    if params.packing and shape.varlen:
        return MicroBatch(sum(longest), supervised, 1)
    if not params.packing:
        return MicroBatch(len(longest) * longest[0], supervised, len(longest))
    total, capacity = sum(longest), max(params.max_seq_length, longest[0])
    rows = min(len(longest), 2 * total // capacity + 1)
    return MicroBatch(rows * min(capacity, total), supervised, rows)


def reference_shapes() -> list[Shape]:
    data = json.loads((resources.files("lunatrain") / "resources" / "memplan" / "reference-shapes.json").read_text())
    return [Shape.from_config(s, s["name"]) for s in data["shapes"]]


def usable(free: int, kind: str) -> int:
    """What a job may plan to use of `free` bytes on a device of `kind` (BUDGET_FRACTION says why not all)."""
    return int(free * BUDGET_FRACTION.get(kind, 0.85))


def capabilities(device: dict[str, Any], params: LoraParams | None = None) -> list[str]:
    """`lunatrain health`'s "what this machine can train": for each reference shape, whether a LoRA job
    with `params` (default: LoraParams(), r=16, 4 x 1024 tokens) fits as it is or with --quantize=4bit."""
    params = params or LoraParams()
    kind = device.get("type", "cpu")
    free = int(device.get("memoryFree") or 0)
    # The verdicts compare against the usable part of the free memory: name both, or "needs 20.2 GiB" beside
    # "22.0 GiB free" reads as a contradiction.
    head = (
        f"What this {kind} can train ({_gib(free)} free, {_gib(usable(free, kind))} usable; LoRA r={params.rank}, "
        f"{params.batch_size} x {params.max_seq_length} tokens per micro-batch):"
    )
    lines, plain, quantized = [head], None, None
    for shape in reference_shapes():
        as_is = plan(shape, params.model_copy(update={"quantize": "none"}), device)
        q4 = plan(shape, params.model_copy(update={"quantize": "4bit"}), device)
        if as_is.fits:
            plain = shape.name
            verdict = f"fits ({_gib(as_is.total)}{', checkpointing' if as_is.checkpointing else ''})"
        elif q4.fits:
            quantized = shape.name
            verdict = f"fits with --quantize=4bit ({_gib(q4.total)}{', checkpointing' if q4.checkpointing else ''})"
        else:
            verdict = f"too large (needs {_gib(q4.total)} even in 4 bits)"
        lines.append(f"  {shape.name:<14} {verdict}")
    largest = [f"{plain} as it is" if plain else None, f"{quantized} with --quantize=4bit" if quantized else None]
    lines.append("  largest: " + ("; ".join(x for x in largest if x) or "none of these shapes"))
    return lines
