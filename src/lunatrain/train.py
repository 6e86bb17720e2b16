"""LoRA training: `run_lora(params, settings)` → a PEFT adapter in data/adapters/<name>/<version>/.

Order of a run: validate everything (one UsageError listing every problem, nothing written) → load the
base model and attach a fresh LoRA (never adapter on adapter) → base validation loss once (adapter off) →
the loop below, with validation loss and a resumable checkpoint after each epoch → adapter + report into a
work directory → moved into place and registered only on success.

Batching: `batchSize` counts samples, with packing on or off, so packing never changes the optimization,
only the speed. Each micro-batch of samples is laid out by `tokens.make_batch`: with the per-sample
attention of `kernels` (most decoder architectures) as one unpadded row plus the sample boundaries;
otherwise as first-fit rows of `maxSeqLength` tokens with position ids restarting per sample, which with
no attention mask and `use_cache=False` makes transformers isolate the samples by a block mask. The loss
is the sum of token losses divided by the number of supervised tokens in the whole optimizer step (all
accumulated micro-batches), so long and short samples weigh per token, whatever the batch layout.

Determinism: the seed fixes LoRA init, and with the epoch (and rank) the dropout stream and the data order,
so the same seed gives byte-identical adapter weights on CPU, and a run resumed from its epoch checkpoint
(adapter, optimizer and scheduler state) ends exactly where an uninterrupted run ends.

Under `torchrun` the same loop runs data-parallel (`distributed`): micro-batches are dealt out across
ranks, gradients summed, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shlex
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, checkpoints, distributed, kernels, memplan, registry
from .compat import (
    enable_checkpointing,
    masked_logits_supported,
    peft_quiet,
    peft_wrapping,
    saves_embeddings,
    with_bitsandbytes,
)
from .distributed import World
from .errors import CheckFailed, Conflict, LunaError, StorageError, UsageError, is_out_of_memory
from .fsio import (
    atomic_write_bytes,
    atomic_write_json,
    check_writable,
    dumps_json,
    give_umask_modes,
    holding,
    os_error_of,
    storage_error,
)
from .fsio import identity as identity_of
from .loss import chunk_tokens, chunked_loss_sum, lean_loss_check
from .messages import coded, counted
from .params import (
    LoraParams,
    check_adapter_name,
    parse_params,
    run_identity_of,
    run_key,
    steps_per_epoch,
    total_steps,
    trained_key,
)
from .settings import Settings, check_name
from .startup import import_training_stack
from .tokens import Batch, Encoded, make_batch
from .wire import camel, now_iso

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from .export import TierData
    from .models import BaseModelInfo
    from .tokens import TokenizedTier

Event = dict[str, Any]


class Status(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class TrainResult:
    status: Status
    adapter_name: str
    version: str | None = None  # set when the adapter was registered
    path: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None  # {"code", "message"} unless succeeded
    # The tier the run read (export.TierData): its gate judges on this data, not on an export made meanwhile.
    data: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED


class Stop(Exception):
    """Ends the loop early with a status (cancelled, or failed with an error code such as nan_loss)."""

    def __init__(self, status: Status, code: str, message: str, params: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.params = status, code, message, params


@dataclass
class LoopState:
    """Where the loop stands: what an epoch checkpoint saves and a resume restores."""

    epoch: int = 0
    step: int = 0
    base_val_loss: float | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    resumed_from: int | None = None


@dataclass
class Run(LoopState):
    """Everything the loop needs, prepared and validated before the first write, and its progress (the
    LoopState fields, restored from a checkpoint on resume)."""

    params: LoraParams = field(kw_only=True)
    settings: Settings = field(kw_only=True)
    base: BaseModelInfo = field(kw_only=True)
    tokenizer: PreTrainedTokenizerBase = field(kw_only=True)
    model: PeftModel = field(kw_only=True)
    device: str = field(kw_only=True)
    autocast_dtype: torch.dtype | None = field(kw_only=True)
    data: TierData = field(kw_only=True)
    tokens: TokenizedTier = field(kw_only=True)
    train: list[Encoded] = field(kw_only=True)
    val: list[Encoded] = field(kw_only=True)
    steps_per_epoch: int = field(kw_only=True)
    total_steps: int = field(kw_only=True)
    work_dir: Path = field(kw_only=True)
    identity: dict[str, Any] = field(kw_only=True)  # run_identity: what a checkpoint records, the report's hashes
    kernels: dict[str, str] = field(default_factory=dict, kw_only=True)  # kernels.install's choice
    added_tokens: list[str] = field(default_factory=list, kw_only=True)  # template markers added to the vocabulary
    loss: dict[str, Any] = field(default_factory=lambda: {"path": "plain"}, kw_only=True)  # chunked or plain, and why
    plan: memplan.MemoryPlan | None = field(default=None, kw_only=True)  # the estimate and checkpointing decision
    world: World = field(default=distributed.SINGLE, kw_only=True)
    job_id: str | None = field(default=None, kw_only=True)  # the trainer job this run is, if any
    root: tuple[int, int] | None = field(default=None, kw_only=True)  # the data root's folder (fsio.identity)
    optimizer: torch.optim.Optimizer | None = field(default=None, kw_only=True)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = field(default=None, kw_only=True)

    def restore(self, state: LoopState) -> None:
        """Continue from a checkpoint's loop state."""
        for name in LoopState.__dataclass_fields__:
            setattr(self, name, getattr(state, name))


# --- entry point ----------------------------------------------------------------------------------


class _RunTurn:
    """A lock that knows the thread holding it (`run_lora` refuses to wait for its own thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self.owner = threading.get_ident()

    def __exit__(self, *_exc: object) -> None:
        self.owner = None
        self._lock.release()


_ONE_RUN = _RunTurn()


def run_lora(
    params: LoraParams | dict,
    settings: Settings,
    *,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool | str] | None = None,
    job_id: str | None = None,
    stage: bool = False,
) -> TrainResult:
    """Train one LoRA adapter. Bad input raises UsageError before anything is written; once training has
    started every outcome is a TrainResult (failure is data: status + error in the report). `stage`: an
    eval gate will judge the run, so an overwrite run waits beside its slot (registry.settle_slot)."""
    params = parse_params(params) if isinstance(params, dict) else params
    _import_stack(params)
    import torch

    world = distributed.from_env()
    if _ONE_RUN.owner == threading.get_ident():  # from a callback of the run itself: it would wait for itself
        raise UsageError("run_lora was called from within a run (its on_event or should_stop); start it after.")
    # One run at a time in a process (a notebook's threads): a run seeds and draws from torch's one generator,
    # so two at once would each train other weights than alone. And a caller's `torch.no_grad()` or
    # `inference_mode()` (a cell that evaluated something first) would fail the run at its first backward.
    with (
        _ONE_RUN,
        torch.inference_mode(False),
        torch.enable_grad(),
        distributed.process_group(world, _group_device(params)),
    ):
        try:
            return _run_lora(params, settings, world, on_event or (lambda _e: None), should_stop, job_id, stage)
        except Exception as exc:
            if world.active and not isinstance(exc, distributed.RankFailed):  # stamped before the group goes
                raise distributed.leave(world, exc, failure(exc, "error")) from exc
            raise


def _import_stack(params: LoraParams) -> None:
    """torch, transformers and PEFT at the imports' least cost (startup.py) in a command's own process; a run
    that quantizes lifts the bitsandbytes block first (PEFT looks for bitsandbytes only when imported)."""
    if params.quantize != "none":
        with_bitsandbytes()
    import_training_stack()


def _group_device(params: LoraParams) -> str:
    from .models import resolve_device

    try:
        return resolve_device(params.device)
    except LunaError:
        return "cpu"  # prepare() reports the bad device on every rank


def _run_lora(
    params: LoraParams,
    settings: Settings,
    world: World,
    emit: Callable[[Event], None],
    should_stop: Callable[[], bool | str] | None,
    job_id: str | None,
    stage: bool = False,
) -> TrainResult:
    # A registry this run could not publish to (damaged, a folder in its place) would refuse it only after
    # the whole run: said before the model loads, with its fix (`adapters repair`).
    registry.load(settings)
    run = prepare(params, settings, world)
    run.job_id = job_id
    # Held while the run trains and publishes: its epoch checkpoints are the resume point, and a run started
    # outside the trainer has no job row to keep `gc` from them (retention.py). A resume holds it alone: two
    # resumes of one run (a scheduled `--resume` beside a manual one, beside `jobs resume`) would train in
    # one folder, each deleting the other's checkpoints, and register the same run twice.
    with _held(run) if world.main else contextlib.nullcontext():
        _refuse_a_finished_run(run)
        return _train_and_conclude(run, emit, should_stop, job_id, stage)


def _refuse_a_finished_run(run: Run) -> None:
    """A resume that finds no checkpoint of its run, of which a version is registered: another resume finished
    it meanwhile (two at once, or a `jobs resume` queued behind another), or it had finished before. Starting
    over would train the run again and register the same weights as another version. (A run interrupted
    before its first checkpoint has no version: its resume starts over, as before.) Every rank reads the
    same registry, so all refuse together."""
    if not run.params.resume or checkpoints.saved_states(run.work_dir.parent, run.work_dir.name):
        return
    key = run_key(run.identity)
    try:
        versions = registry.list_adapters(run.settings).get(run.params.adapter_name, {}).get("versions", [])
    except LunaError:  # an unreadable registry is the publish step's to say
        return
    done = next((v for v in reversed(versions) if v.get("runKey") == key and not v.get("replaced")), None)
    if done is not None:
        name = run.params.adapter_name
        raise UsageError(  # a request the data root's state refuses (exit 2, as `jobs resume` of a finished job)
            f"Nothing to resume: this run already finished as {name}@{done['version']}; to train it again, start it "
            "without resuming.",
            code="train.already_finished",
            params={"name": name, "version": done["version"]},
        )


RESUME_PATIENCE_S = 5.0


@contextlib.contextmanager
def _held(run: Run) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            # a few seconds' patience: gc's look at the folder holds it for an instant, and an orphan of a
            # stopped trainer may still be going
            stack.enter_context(holding(run.work_dir, alone=run.params.resume, patience=RESUME_PATIENCE_S))
        except BlockingIOError:
            folder = run.work_dir.relative_to(run.settings.home)
            raise Conflict(
                f"Another process is training this run from its checkpoint in {folder} right now (another "
                "`--resume` or a trainer job); wait for it to end, or stop it, before resuming again.",
                code="train.resume_busy",
                params={"path": str(folder)},
            ) from None
        yield


def _train_and_conclude(
    run: Run,
    emit: Callable[[Event], None],
    should_stop: Callable[[], bool | str] | None,
    job_id: str | None,
    stage: bool,
) -> TrainResult:
    """Train `run` (from its checkpoint when resuming), then conclude it: rank 0 publishes or records it, the
    other ranks return its outcome."""
    params, world = run.params, run.world
    started = time.monotonic()  # for the run's duration: a wall clock may step meanwhile
    status, error = Status.SUCCEEDED, None
    from .models import cpu_threads_for

    try:
        setup_optimizer(run)
        if params.resume and (state := checkpoints.load(run, emit)) is not None:
            run.restore(state)
        with cpu_threads_for(run.model, run.device):
            train(run, emit, should_stop)
    except Stop as stop:
        status, error = stop.status, {"code": stop.code, "message": stop.message}
        error |= {"params": stop.params} if stop.params else {}
    except KeyboardInterrupt:
        # Quit at once (a second Ctrl-C): no step is finished, but the run is recorded as cancelled before the
        # interrupt goes on, so the report and `status` do not describe an older run; the checkpoints stay.
        if world.main:
            message = f"interrupted at step {run.step} of {run.total_steps}"
            error = {"code": "cancelled", "message": message, "params": _stopped_at(run)}
            with contextlib.suppress(OSError):
                _record(run, build_report(run, Status.CANCELLED, error, started, job_id))
        raise
    except Exception as exc:  # a crash inside the loop is reported, and the checkpoints stay for resume
        status, error = Status.FAILED, _resumable(run, failure(exc, "error", params=params), job_id)
        if world.active:  # the others may wait in this step's all-reduce: leave the group (distributed.py)
            leaving = distributed.leave(world, exc, error)  # a lost peer: another rank's failure is the cause
            if world.main:
                conclude(run, status, leaving.error, build_report(run, status, leaving.error, started, job_id), emit)
            raise leaving from exc
    report = build_report(run, status, error, started, job_id)
    if not world.main:  # rank 0 writes and registers; the other ranks return its outcome
        status_value, version, path, error = distributed.share(world, None)
        return TrainResult(
            Status(status_value), params.adapter_name, version, Path(path) if path else None, report, error
        )
    result = conclude(run, status, error, report, emit, stage=stage)
    distributed.share(
        world, (result.status.value, result.version, str(result.path) if result.path else None, result.error)
    )
    return result


def failure(exc: Exception, code: str, writing: str | None = None, params: LoraParams | None = None) -> dict[str, Any]:
    """The run's error for `exc`: a LunaError (a full disk met by a checkpoint write) keeps its code and
    sentence; with `writing` (what the failed block wrote), an OS error (safetensors reports ENOSPC only inside
    its own exception's text) becomes the storage sentence for it; anything else `code` with the exception."""
    if writing is not None and not isinstance(exc, LunaError) and (os_exc := os_error_of(exc)) is not None:
        exc = storage_error(os_exc, writing)
    if isinstance(exc, LunaError):  # with its values: a client says the code's text with them filled in
        return {"code": exc.code, "message": exc.message, **({"params": exc.params} if exc.params else {})}
    said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if out_of_memory(exc):
        # torch's own text runs over lines of allocator statistics: its first line says what was asked
        first = said.splitlines()[0].split(" GPU ")[0].strip().rstrip(".")
        return {"code": "out_of_memory", "message": f"The device ran out of memory ({first}); {oom_advice(params)}."}
    return {"code": code, "message": said}


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device ran out of memory (errors.is_out_of_memory)."""
    return is_out_of_memory(type(exc).__name__, str(exc))


def oom_advice(params: LoraParams | None = None) -> str:
    """What lowers a run's memory peak, smallest change first (memplan.py counts each), leaving out what the
    run already does."""
    options = []
    if params is None or params.gradient_checkpointing != "true":
        options.append("--gradientCheckpointing=true")
    if params is None or params.batch_size > 1:
        options.append("a smaller --batchSize with a larger --gradientAccumulation (the same samples a step)")
    options.append("a smaller --maxSeqLength")
    if params is None or params.quantize == "none":
        options.append("--quantize=4bit")
    return "lower the run's peak with " + ", ".join(options[:-1]) + (", or " if len(options) > 1 else "") + options[-1]


def conclude(
    run: Run,
    status: Status,
    error: dict | None,
    report: dict[str, Any],
    emit: Callable[[Event], None],
    *,
    stage: bool = False,
) -> TrainResult:
    """Publish a successful run; record a failed one (report in the work dir and as the latest report)."""
    if status is Status.SUCCEEDED:
        before = {p.name for p in run.work_dir.iterdir()}
        try:
            return finish(run, report, emit, stage=stage)
        except LunaError:
            raise
        except Exception as exc:  # e.g. a full disk while saving: the run failed, the checkpoints remain
            error = failure(exc, "save_failed", f"the adapter in {run.work_dir}")
            status, error = Status.FAILED, _resumable(run, error, report.get("jobId"))
            report.update(status=status.value, error=error)
            # What the save wrote in part goes: on a full disk it holds the space the report below needs,
            # and a resume writes it again from the checkpoint.
            for part in run.work_dir.iterdir():
                if part.name not in before:
                    shutil.rmtree(part) if part.is_dir() else part.unlink(missing_ok=True)
    emit(
        {
            "type": "log",
            "message": f"training {status.value}: {error['message'] if error else ''}",
            **coded("log.training_ended", status=status.value, message=error["message"] if error else ""),
        }
    )
    _record(run, report)
    return TrainResult(status, run.params.adapter_name, report=report, error=error)


def _record(run: Run, report: dict[str, Any]) -> None:
    """A run that published nothing: its report in its work dir and as the latest report (not in a data root
    moved or replaced since it started: that would make a new one at the old path)."""
    if root_moved(run):
        return
    atomic_write_json(run.work_dir / registry.REPORT_FILE, report)
    registry.write_latest(run.settings, report)


def root_moved(run: Run) -> bool:
    """Whether the data root the run started in is no longer at its path (moved, renamed with a folder above it,
    or replaced by another folder)."""
    return run.root is not None and identity_of(run.settings.home) != run.root


def check_root(run: Run) -> None:
    """StorageError when the data root moved since the run started: every path of the run names the old place,
    and writing there made a whole new data root (a registry, the adapter active in it) while the moved one got
    nothing. The run stops before it writes; its checkpoints moved with the root."""
    if root_moved(run):
        raise StorageError(
            f"The data root {run.settings.home} was moved or replaced while this run trained, so nothing more was "
            "written there; run it again (or resume it from its last checkpoint) in the data root's new place.",
            code="storage.root_moved",
        )


def _resumable(run: Run, error: dict[str, Any], job_id: str | None) -> dict[str, Any]:
    """A failed run outside a job with an epoch checkpoint to go on from: its message says how, as a Ctrl-C's
    does (the same command again would start from step 0). A job's worker names `jobs resume` itself. Asked of
    the disk: `run.epoch` counts an epoch whose checkpoint was being written when the disk filled."""
    if job_id is not None or not checkpoints.saved_states(run.work_dir.parent, run.work_dir.name):
        return error
    return error | {
        "message": f"{error['message'].rstrip()} An epoch checkpoint of this run is kept: run the same command "
        "with --resume to continue from it."
    }


def _stopped_at(run: Run) -> dict[str, int]:
    """Where a stopped run stands; epochsDone: whether an epoch checkpoint (this run's, or the one it resumed
    from) is there for a resume."""
    return {"step": run.step, "totalSteps": run.total_steps, "epochsDone": run.epoch}


# --- validation and setup -------------------------------------------------------------------------


def prepare(params: LoraParams, settings: Settings, world: World = distributed.SINGLE) -> Run:
    """Check every input, collecting all problems into one error; then load model and data.
    Writes nothing but caches (luna-tiny build, tokenized data)."""
    from .export import read_tier, refuse_nothing_to_train, refuse_replaced, refuse_withdrawn
    from .models import (
        check_expert_dropout,
        check_stored_quantization,
        check_target_modules,
        module_kinds,
        resolve_base,
        resolve_device,
    )

    problems: list[LunaError] = []

    def check(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except LunaError as err:
            problems.append(err)
            return None

    check(lambda: check_name(params.adapter_name, "adapter name"))
    check(lambda: check_adapter_name(params, params.base_model or settings.base_model))
    device = check(lambda: resolve_device(params.device))
    data = check(lambda: read_tier(settings, params.dataset_tier))
    if data is not None and not data.train:
        # samples all in val/test: the export's sentence (more samples or lower ratios), not "add examples" to none
        said = len(problems)
        check(lambda: refuse_nothing_to_train(settings, params.dataset_tier))
        if len(problems) == said:  # no sample at all
            problems.append(
                CheckFailed(
                    f"The {params.dataset_tier} tier has no training samples; add examples and export again.",
                    code="train.no_samples",
                    params={"tier": params.dataset_tier},
                )
            )
    check(lambda: refuse_replaced(settings, params.dataset_tier))
    if data is not None:
        check(lambda: refuse_withdrawn(settings, params.dataset_tier, data))
    if problems:  # cheap checks first: a bad request never builds or loads a model
        raise one_error(problems)
    # The run ends by publishing: storage that cannot take the adapter is said now, not after the training.
    check_writable(registry.publish_folders(settings, params.adapter_name), f"train {params.adapter_name}")
    base = check(lambda: resolve_base(params.base_model, settings))
    if base is not None:
        check(lambda: registry.check_slot_base(settings, params.adapter_name, params.adapter_strategy, base))
    if base is not None and not isinstance(params.target_modules, str):
        # From the model built on the meta device, as prepare checks them: a mistyped name costs no weight load.
        check(lambda: check_target_modules(params.target_modules, module_kinds(base), base.id))
    if base is not None:
        check(lambda: check_stored_quantization(params.quantize, base))
        check(lambda: check_expert_dropout(params, base))
    if problems:
        raise one_error(problems)
    return _load(params, settings, base, device, data, world)


def _token_rows(model: Any, ids: list[int]) -> list[int] | dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for the template markers `ids` added to the vocabulary: their rows of the
    input embeddings, and of the output layer where it is a weight of its own (untied: Mistral, Llama 3 8B,
    Qwen2.5 7B). A list trains the input rows alone, and the untrained output row of an added end-of-turn
    token is one the model can hardly ever predict: it would not learn to stop."""
    if not ids:
        return None
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or getattr(outputs, "weight", None) is inputs.weight:
        return ids
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return {names[inputs]: ids, names[outputs]: ids}


def refuse_special_tokens(params: LoraParams, tokenizer: Any, data: Any) -> None:
    """CheckFailed for data with a literal special token in its text, as prepare fails it: the tokenizer reads
    a typed `<|im_start|>` as a turn header, a typed `<|im_end|>` as a stop in the middle of an answer. A run
    never trains those as text silently (prepare may have been skipped)."""
    from .prepare import special_token_samples

    found = special_token_samples(data.records, tokenizer)
    if found:
        shown = ", ".join(found[:10]) + (", …" if len(found) > 10 else "")
        raise CheckFailed(
            f"{counted(len(found), 'sample')} of the {params.dataset_tier} tier {'holds' if len(found) == 1 else 'hold'} "
            f"a literal special token in {'its' if len(found) == 1 else 'their'} text, which the tokenizer would train "
            f"as a control token ({shown}); fix or reject {'it' if len(found) == 1 else 'them'} and export again "
            "(`lunatrain prepare` lists them).",
            code="train.special_tokens",
            params={"count": len(found), "tier": params.dataset_tier, "examples": found[:10]},
        )


def one_error(problems: list[LunaError]) -> LunaError:
    """Every problem in one sentence, with the exit code and HTTP status `lunatrain prepare` gives the same
    problem: a single one as it is (its code and parameters too); several as the caller's mistake when one of
    them is (exit 2, 422: fix the command first), else as the first one's kind (no export: 1, a damaged file:
    503)."""
    if len(problems) == 1:
        return problems[0]
    kind = UsageError if any(isinstance(p, UsageError) for p in problems) else type(problems[0])
    return kind(" ".join(p.message for p in problems))


def refuse_over_context(params: LoraParams, tokens: Any, base: Any) -> None:
    """Samples that maxSeqLength lets keep more tokens than the base model's context (prepare's `over_context`
    check): a model with learned positions fails on them, one with rotary positions trains places it never
    answers from. Refused before the model loads."""
    from .models import context_length

    context = context_length(base)
    if context is None or params.max_seq_length <= context:
        return
    over = sum(len(found) for found in tokens.longer_than(context).values())
    if over:
        sample = counted(over, "sample")
        raise UsageError(
            f"{sample} {'is' if over == 1 else 'are'} longer than the base model's context of {context} tokens, "
            f"which maxSeqLength={params.max_seq_length} lets {'it' if over == 1 else 'them'} keep; set "
            f"maxSeqLength to {context} or less (prepare names {'it' if over == 1 else 'them'}).",
            code="train.over_context",
            params={"count": over, "context": context, "maxSeqLength": params.max_seq_length},
        )


def _load(params: LoraParams, settings: Settings, base: Any, device: str, data: Any, world: World) -> Run:
    import torch

    from .models import load_chat_tokenizer
    from .tokens import tokenize_tier

    tokenizer, added = load_chat_tokenizer(base, settings, params.chat_template)
    refuse_special_tokens(params, tokenizer, data)
    tokens = tokenize_tier(settings, params.dataset_tier, tokenizer, params.max_seq_length, data=data, base=base)
    refuse_over_context(params, tokens, base)
    train_set = [e for e in tokens.train if e.n_supervised]  # nothing to learn from the others
    val_set = [e for e in tokens.val if e.n_supervised]
    if not train_set:
        raise UsageError(
            "No training sample has an assistant token left after masking and truncation; "
            "check the data or raise maxSeqLength."
        )
    from .models import compute_dtype

    bf16 = compute_dtype(device) == torch.bfloat16
    plan = memplan.check_fits(
        settings,
        params,
        memplan.device_memory(device),
        base=base,
        samples=train_set,
    )
    model, chosen, loss = load_lora_model(
        params, settings, base, device, bf16, plan.checkpointing, tokenizer=tokenizer, added=added
    )
    identity = run_identity(params, base, data, tokenizer)
    per_epoch = steps_per_epoch(len(train_set), params, world.size)
    distributed.share_params(world, [p for p in model.parameters() if p.requires_grad])
    return Run(
        root=identity_of(settings.home),
        params=params,
        settings=settings,
        base=base,
        tokenizer=tokenizer,
        model=model,
        device=device,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        data=data,
        tokens=tokens,
        train=train_set,
        val=val_set,
        steps_per_epoch=per_epoch,
        total_steps=total_steps(len(train_set), params, world.size),
        work_dir=distributed.share(
            world,
            _work_dir(
                params,
                settings,
                identity,
                named_base_run_key(params, identity),
                legacy_run_key(params, base, data),
                ranks=world.size,
            ),
        ),
        identity=identity,
        kernels=chosen,
        world=world,
        added_tokens=added,
        loss=loss,
        plan=plan,
    )


def load_lora_model(
    params: LoraParams,
    settings: Settings,
    base: Any,
    device: str,
    bf16: bool,
    checkpointing: bool,
    *,
    tokenizer: Any = None,
    added: list[str] | None = None,
) -> tuple[Any, dict[str, str], dict[str, Any]]:
    """The base model (quantized when asked) with a fresh LoRA, checkpointing and kernels in place; with
    `kernels.install`'s choice and the loss path (`loss.lean_loss_check`). Template markers in `added`
    (missing from the vocabulary) get their embedding rows trained."""
    _import_stack(params)  # run_lora did it; bench/memory.py calls this directly
    import torch
    from peft import LoraConfig, get_peft_model

    from .models import load_model, lora_exclusions
    from .templates import check_embedding_room

    torch.manual_seed(params.seed)  # LoRA init draws from the global generator
    model = load_model(base, settings, device, torch.bfloat16 if bf16 else torch.float32, params.quantize)
    model.config.use_cache = False  # a KV cache in training breaks packed-sample isolation
    targets = params.target_modules if isinstance(params.target_modules, str) else list(params.target_modules)
    # Template markers the vocabulary lacked get their embedding rows trained (saved with the adapter).
    rows = model.get_input_embeddings().weight.shape[0]
    new_ids = check_embedding_room(rows, tokenizer, added or [], base.id) if added else []
    config = LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=targets,
        exclude_modules=lora_exclusions(model, targets),
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=_token_rows(model, new_ids),
    )
    try:
        with peft_wrapping():
            model = get_peft_model(model, config)
    except ValueError as exc:
        raise UsageError(f"targetModules {params.target_modules!r} do not fit base model {base.id!r}: {exc}") from exc
    if checkpointing:  # non-reentrant: works with frozen embeddings, replays dropout's RNG
        if not getattr(model, "supports_gradient_checkpointing", False):
            fix = (
                "train without it"
                if params.gradient_checkpointing == "true"
                else "this job needs it to fit in "
                "memory: try --quantize=4bit, a smaller --batchSize or a shorter --maxSeqLength"
            )
            raise UsageError(f"Base model {base.id!r} does not support gradientCheckpointing; {fix}.")
        enable_checkpointing(model)
    chosen = kernels.install(model, device)
    why_plain = lean_loss_check(model, device)
    loss = (
        {"path": "plain", "reason": why_plain}
        if why_plain
        else {"path": "chunked", "chunkTokens": chunk_tokens(model.get_output_embeddings().weight.shape[0])}
    )
    return model, chosen, loss


def run_identity(params: LoraParams, base: Any, data: Any, tokenizer: Any) -> dict[str, Any]:
    """What makes two tries one run for resuming: the parameters (resume aside), the trained tier's own file
    (not the whole export: approving an example of another tier or adding a memory item changes nothing the
    run trains on), the base weights, and the tokenizer and chat template that turned the data into tokens
    (a resume across a changed template would train one adapter on two). The base counts by its weights'
    fingerprint, not by where it lies: a data root moved with the base inside it is the same run."""
    from .models import template_hash, tokenizer_hash

    return run_identity_of(
        params,
        data=data.sha256,
        base=base.fingerprint,
        tokenizer=tokenizer_hash(tokenizer),
        template=template_hash(tokenizer),
    )


def named_base_run_key(params: LoraParams, identity: dict[str, Any]) -> str:
    """The key of this run's checkpoints saved while the identity still held the base model's name (as
    given: a path moves with its data root). Read only, so that an upgrade resumes them; goes when such
    checkpoints are past ASSISTANT_RETAIN_CHECKPOINT_DAYS everywhere."""
    return run_key(identity | {"params": identity["params"] | {"base_model": params.base_model}})


def legacy_run_key(params: LoraParams, base: Any, data: Any) -> str:
    """The key of runs whose checkpoints recorded no identity (lunatrain before `run_identity`): parameters,
    the whole export's fingerprint and the base weights. Read only, so that an upgrade resumes them; goes
    when such checkpoints are past ASSISTANT_RETAIN_CHECKPOINT_DAYS everywhere."""
    return run_key(
        {
            "params": params.model_dump(mode="json", exclude={"resume"}),
            "data": data.fingerprint,
            "base": base.fingerprint,
        }
    )


def _work_dir(
    params: LoraParams,
    settings: Settings,
    identity: dict[str, Any],
    named_base: str | None = None,
    legacy: str | None = None,
    ranks: int | None = None,
) -> Path:
    """`ranks`: the run's data-parallel processes. A checkpoint of another number of processes is of another
    schedule: not resumed, and a fresh run's work dir is another one, so that its checkpoints never replace
    that one's."""
    root = registry.work_root(settings, params.adapter_name)
    key = run_key(identity)
    if params.resume:
        # Several tries of this run may have left checkpoints (each try has its own work dir): resume the one
        # that got furthest (epoch names are zero-padded), the newest of equals — not whichever random suffix
        # sorts last. Checkpoints of this run saved by earlier releases are under `named_base` (the identity
        # held the base's name) or, saved before they recorded any identity, under `legacy`.
        for named in (key, named_base, legacy):
            existing = checkpoints.saved_states(root, f"{named}-*") if named else []
            if existing:  # this run's newest work under each key, damaged: said, not passed over
                checkpoints.check_state(settings, checkpoints.furthest(existing))
            existing = [p for p in existing if named != legacy or checkpoints.recorded_run(p) is None]
            existing = [p for p in existing if ranks is None or checkpoints.same_world(p, ranks)]
            if existing:
                return checkpoints.furthest(existing).parents[2]
    return root / f"{key}-{uuid.uuid4().hex[:8]}"


def setup_optimizer(run: Run) -> None:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    trainable = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(
        trainable,
        lr=run.params.learning_rate,
        weight_decay=run.params.weight_decay,
        fused=run.device == "cuda",
    )
    # At most all steps but the last: a warmup step's learning rate starts at 0, so a run whose every step warms
    # up (one step: a small store's example adapter) would change nothing and pass its gate as "no worse".
    warmup = min(math.ceil(run.params.warmup_ratio * run.total_steps), max(run.total_steps - 1, 0))
    run.scheduler = get_cosine_schedule_with_warmup(run.optimizer, warmup, run.total_steps)


# --- the loop -------------------------------------------------------------------------------------


def epoch_steps(run: Run, epoch: int) -> list[list[list[Encoded]]]:
    """The epoch's optimizer steps, each a list of micro-batches of samples, in a seeded shuffled order.
    A step holds gradientAccumulation micro-batches per rank; rank r trains micro-batches r, r+N, …"""
    import torch

    gen = torch.Generator().manual_seed(run.params.seed * 1_000_003 + epoch)
    order = torch.randperm(len(run.train), generator=gen).tolist()
    bs = run.params.batch_size
    micro = [[run.train[i] for i in order[k : k + bs]] for k in range(0, len(order), bs)]
    per_step = run.params.gradient_accumulation * run.world.size
    return [micro[k : k + per_step] for k in range(0, len(micro), per_step)]


def trained_samples(run: Run) -> list[Encoded]:
    """The samples the run's optimizer steps took, every rank's: the whole train split unless maxSteps ended
    the run inside an epoch. Recomputed from the seeded order (the same the loop used, also across a
    resume), for marking the run stale when one of them is deleted."""
    out: list[Encoded] = []
    step = 0
    for epoch in range(run.params.epochs):
        for micro_batches in epoch_steps(run, epoch):
            if step >= run.total_steps:
                return out
            out += [sample for micro in micro_batches for sample in micro]
            step += 1
    return out


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the dropout stream for one epoch on one rank: reseeding per epoch makes a resumed run draw
    what the uninterrupted run drew, and ranks draw different masks."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{rank}".encode()).digest()[:8], "little")


def train(run: Run, emit: Callable[[Event], None], should_stop: Callable[[], bool | str] | None) -> None:
    import torch

    p, model, opt, sched, world = run.params, run.model, run.optimizer, run.scheduler, run.world
    trainable = [x for x in model.parameters() if x.requires_grad]
    if run.base_val_loss is None and run.val:
        with model.disable_adapter():
            run.base_val_loss = evaluate(run, run.val)
        emit({"type": "eval", "epoch": 0, "valLoss": None, "baseValLoss": run.base_val_loss})
    emit(
        {
            "type": "log",
            "message": f"training {counted(len(run.train), 'sample')}, {counted(run.total_steps, 'step')} on {run.device}",
            **coded("log.training_started", samples=len(run.train), steps=run.total_steps, device=run.device),
        }
    )
    schedule = run.steps_per_epoch * run.params.epochs
    if run.params.max_steps and run.params.max_steps > schedule:  # a cap, not a target: said, not silently ignored
        emit(
            {
                "type": "log",
                "message": f"maxSteps {run.params.max_steps} is beyond the {schedule} steps the schedule holds "
                f"({counted(run.params.epochs, 'epoch')}): the run ends after them",
                **coded(
                    "log.max_steps_beyond", maxSteps=run.params.max_steps, steps=schedule, epochs=run.params.epochs
                ),
            }
        )
    left = {split: (run.tokens.stats.get(split) or {}).get("noSupervised", 0) for split in ("train", "val")}
    if any(left.values()):  # said here too: `lora` alone (or an API job) may run without prepare's length check
        counts = {split: (run.tokens.stats.get(split) or {}).get("count", 0) for split in ("train", "val")}
        emit(
            {
                "type": "log",
                "message": f"{left['train']} of {counts['train']} train and {left['val']} of {counts['val']} val "
                f"samples have no answer token within maxSeqLength {p.max_seq_length} and are left out "
                "(prepare's length check lists them)",
                **coded(
                    "log.samples_left_out",
                    train=left["train"],
                    trainTotal=counts["train"],
                    val=left["val"],
                    valTotal=counts["val"],
                    maxSeqLength=p.max_seq_length,
                ),
            }
        )
    t0, seconds0, tokens0, step0 = time.perf_counter(), run.train_seconds, run.tokens_seen, run.step
    for epoch in range(run.epoch, p.epochs):
        if run.step >= run.total_steps:
            break
        model.train()
        torch.manual_seed(epoch_seed(p.seed, epoch, world.rank))
        epoch_loss, epoch_supervised = 0.0, 0.0  # trainLoss per supervised token, as each step's loss is
        for micro_batches in epoch_steps(run, epoch):
            if run.step >= run.total_steps:
                break
            batches = [batch_of(run, s) for s in micro_batches[world.rank :: world.size]]
            # normalizer for the whole optimizer step, over all micro-batches of all ranks; the stop request
            # rides along, so every rank stops at the same step (a rank that stopped alone would leave the
            # others waiting in the next all-reduce)
            # True is a cancel; a sentence is why the run cannot go on (the worker's trainer is gone)
            reason = should_stop() if should_stop is not None else False
            n_supervised, stopping = distributed.sum_floats(
                world, [sum(b.n_supervised for b in batches), float(bool(reason))], run.device
            )
            if stopping:
                raise _stopped(run, reason)
            opt.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for batch in batches:
                loss = loss_sum(run, batch) / n_supervised
                loss.backward()
                step_loss += loss.item()
                step_tokens += batch.n_tokens
            distributed.sum_grads(world, trainable)
            step_loss, step_tokens = distributed.sum_floats(world, [step_loss, step_tokens], run.device)
            run.tokens_seen += int(step_tokens)
            if not math.isfinite(step_loss):
                raise _diverged("loss", step_loss, run.step + 1)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, p.max_grad_norm))
            if not math.isfinite(grad_norm):  # the loss can stay finite a step longer than its gradients
                raise _diverged("gradient norm", grad_norm, run.step + 1)
            lr = sched.get_last_lr()[0]  # the rate this step runs at (after sched.step() it is the next one's)
            opt.step()
            sched.step()
            run.step += 1
            epoch_loss, epoch_supervised = epoch_loss + step_loss * n_supervised, epoch_supervised + n_supervised
            run.curve.append({"step": run.step, "epoch": epoch + 1, "loss": step_loss, "lr": lr, "gradNorm": grad_norm})
            elapsed = time.perf_counter() - t0
            run.train_seconds = seconds0 + elapsed
            rate = (run.tokens_seen - tokens0) / elapsed if elapsed > 0 else 0.0
            done = run.step - step0
            emit(
                {
                    "type": "progress",
                    "step": run.step,
                    "totalSteps": run.total_steps,
                    "epoch": epoch + 1,
                    "epochs": p.epochs,
                    "percent": round(100.0 * run.step / run.total_steps, 2),
                    "loss": step_loss,
                    "lr": lr,
                    "tokensPerSec": round(rate, 1),
                    "etaSeconds": round(elapsed / done * (run.total_steps - run.step), 1) if done else None,
                }
            )
        val_loss = evaluate(run, run.val) if run.val else None
        run.epochs.append(
            {
                "epoch": epoch + 1,
                "step": run.step,
                "valLoss": val_loss,
                "trainLoss": epoch_loss / epoch_supervised if epoch_supervised else None,
            }
        )
        emit({"type": "eval", "epoch": epoch + 1, "valLoss": val_loss, "baseValLoss": run.base_val_loss})
        run.epoch = epoch + 1
        run.train_seconds = seconds0 + time.perf_counter() - t0
        if world.main:
            check_root(run)  # before writing there: a moved root must not be made again at its old path
            checkpoints.save(run)
        distributed.barrier(world)  # a rank that fails later finds this checkpoint complete on resume
        if val_loss is None:  # an export without a validation split
            said = {
                "message": f"epoch {epoch + 1} done, checkpoint saved",
                **coded("log.epoch_done_no_val", epoch=epoch + 1),
            }
        else:
            said = {
                "message": f"epoch {epoch + 1} done: val loss {val_loss:.4f}, checkpoint saved",
                **coded("log.epoch_done", epoch=epoch + 1, valLoss=val_loss),
            }
        emit({"type": "log", **said})
    # A cancel asked for during the last step is honoured before the run publishes: a version the user
    # cancelled would otherwise be registered (and its gate skipped, the cancel turning it off). A trainer gone
    # by now is no reason to drop a finished run: it publishes, and the restarted trainer settles the job.
    cancel = should_stop is not None and should_stop() is True
    if distributed.sum_floats(world, [float(cancel)], run.device)[0]:
        raise _stopped(run, True)


def _stopped(run: Run, reason: bool | str) -> Stop:
    """The Stop for a stop request: True is a cancel; a sentence is why the run cannot go on (the worker's
    trainer is gone)."""
    where = _stopped_at(run)
    if isinstance(reason, str):
        return Stop(
            Status.FAILED,
            "interrupted",
            f"Stopped at step {run.step} of {run.total_steps}: {reason}; "
            + (checkpoints.RESUME_SAID if run.epoch else "no checkpoint was saved yet, so submit it again."),
            where,
        )
    return Stop(Status.CANCELLED, "cancelled", f"cancelled at step {run.step} of {run.total_steps}", where)


def _diverged(what: str, value: float, step: int) -> Stop:
    """A step whose loss or gradient norm is no longer finite: the run has diverged, whichever saw it first."""
    said = f"{what} became {value} at step {step}; lower the learning rate or check the data."
    return Stop(Status.FAILED, "nan_loss", said, {"step": step, "value": str(value)})


def batch_of(run: Run, samples: list[Encoded]) -> Batch:
    """Packed batches are one flat row when the model runs per-sample attention, first-fit rows otherwise."""
    flat = run.params.packing and kernels.uses_varlen(run.model)
    return make_batch(
        samples, run.params.max_seq_length, run.tokenizer.pad_token_id, packing=run.params.packing, flat=flat
    )


def loss_sum(run: Run, batch: Batch) -> Any:
    """Sum of cross-entropy over the batch's supervised positions (float32), as the run computes it."""
    return batch_loss_sum(run.model, batch, run.device, run.autocast_dtype, run.loss)


def batch_loss_sum(model: Any, batch: Batch, device: str, autocast_dtype: Any, loss: dict[str, Any]) -> Any:
    """Sum of cross-entropy over the batch's supervised positions (float32): chunked (`loss`, the path
    `lean_loss_check` chose) where the model allows, so the logits of the whole micro-batch never exist at
    once. Without a Run for bench/memory.py, which measures this step alone."""
    import torch.nn.functional as F

    if loss["path"] == "chunked":
        return chunked_loss_sum(model, batch, device, autocast_dtype, loss["chunkTokens"])
    logits, targets = forward_supervised(model, batch, device, autocast_dtype)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def forward_supervised(model: Any, batch: Batch, device: str, autocast_dtype: Any = None) -> tuple[Any, Any]:
    """Logits at the supervised positions only ([n, vocab]) and their targets ([n]).

    `logits_to_keep` with a boolean mask makes the model project only those hidden states onto the
    vocabulary: prompt positions (often most of a chat sample) never pay for the output layer.
    """
    import torch

    mask = batch.mask.to(device)
    ctx = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with ctx:
        out = model(
            **batch.model_inputs(device),
            use_cache=False,
            logits_to_keep=mask if masked_logits_supported() else 0,
        )
    logits = out.logits
    if logits.dim() == 3:  # a model that ignores a mask in logits_to_keep returns every position
        logits = logits[mask]
    return logits, batch.targets.to(device)[mask]


def evaluate(run: Run, samples: list[Encoded]) -> float:
    """Mean token loss over `samples` (dropout off, no gradients)."""
    import torch

    run.model.eval()
    total, count = 0.0, 0
    bs = run.params.batch_size  # the micro-batch the memory plan counts (without gradients: less)
    world = run.world
    with torch.no_grad():
        for k in range(world.rank * bs, len(samples), bs * world.size):  # each rank its share of chunks
            batch = batch_of(run, samples[k : k + bs])
            total += float(loss_sum(run, batch))
            count += batch.n_supervised
    total, count = distributed.sum_floats(world, [total, count], run.device)
    run.model.train()
    return total / count if count else float("nan")


# --- output ---------------------------------------------------------------------------------------


def package_versions(quantized: bool = False) -> dict[str, str]:
    """The versions that decide what a run trains; bitsandbytes' too where its layers ran (a quantized run)."""
    out = {"lunatrain": __version__}
    packages = ["torch", "transformers", "peft", "tokenizers", "safetensors"] + (["bitsandbytes"] if quantized else [])
    for pkg in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def build_report(run: Run, status: Status, error: dict | None, started: float, job_id: str | None) -> dict[str, Any]:
    from .models import device_info

    p = run.params
    last_val = run.epochs[-1]["valLoss"] if run.epochs else None
    tps = run.tokens_seen / run.train_seconds if run.train_seconds > 0 else None
    return {
        "format": "lunatrain-training-report/1",
        "status": status.value,
        "error": error,
        "jobId": job_id,
        # When the run ended; a published version's report takes its registry entry's time instead. Without
        # it a cancelled or failed run's report said no time, and `status` took an older job for the last.
        "created": now_iso(),
        "adapterName": p.adapter_name,
        "adapterStrategy": p.adapter_strategy,
        "params": p.wire(),
        "dataset": {
            "tier": p.dataset_tier,
            "fingerprint": run.data.fingerprint,
            "export": camel(run.data.summary),  # as POST /export answers it
            "trainSamples": len(run.train),
            "valSamples": len(run.val),
            "tokenStats": run.tokens.stats,
            "tokenCacheKey": run.tokens.key,
            "tokenCacheHit": run.tokens.cache_hit,
        },
        "baseModel": run.base.record(),
        "tokenizerHash": run.identity["tokenizer"],
        "templateHash": run.identity["template"],
        "runKey": run_key(run.identity),
        # what a daily run compares to know it would repeat this one (runKey for versions from before it)
        "trainedKey": trained_key(run.identity, run.data.trained_sha256),
        "template": {
            "name": p.chat_template or "model",
            "hash": run.identity["template"],
            "terminator": run.tokens.terminator.to_dict(),
            "addedTokens": run.added_tokens,
        },
        "metrics": {
            "valLoss": last_val,
            "baseValLoss": run.base_val_loss,
            "trainLoss": run.epochs[-1]["trainLoss"] if run.epochs else None,
            "steps": run.step,
            "totalSteps": run.total_steps,
            "stepsPerEpoch": run.steps_per_epoch,
            "tokensTrained": run.tokens_seen,
            "tokensPerSec": round(tps, 1) if tps else None,
        },
        "epochs": run.epochs,
        "lossCurve": run.curve,
        "resumedFromEpoch": run.resumed_from,
        "device": {
            "used": run.device,
            "dtype": "bfloat16" if run.autocast_dtype is not None else "float32",
            **device_info(),
        },
        "kernels": run.kernels,
        "loss": run.loss,
        "quantization": quantization(p.quantize, run.autocast_dtype),
        "memoryPlan": run.plan.to_dict() if run.plan else None,
        "dataParallel": {
            "ranks": run.world.size,
            "backend": ("nccl" if run.device == "cuda" else "gloo") if run.world.active else None,
        },
        "packages": package_versions(p.quantize != "none"),
        "durationSeconds": round(time.monotonic() - started, 3),
        "trainSeconds": round(run.train_seconds, 3),
    }


def quantization(quantize: str, autocast_dtype: Any) -> dict[str, Any] | None:
    """How the frozen base was held in training (None: full precision). The adapter itself is always an
    ordinary float32 PEFT adapter for the unquantized base."""
    if quantize == "none":
        return None
    compute = "bfloat16" if autocast_dtype is not None else "float32"
    if quantize == "4bit":
        return {"method": "bitsandbytes", "bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": compute}
    return {"method": "bitsandbytes", "bits": 8, "type": "llm.int8", "computeDtype": compute}


def yaml_string(text: str) -> str:
    """`text` as a double-quoted YAML string: JSON's quoting (YAML reads JSON strings), with the characters
    YAML refuses or reads as a line break (DEL, C1 controls, U+2028/9, U+FEFF, U+FFFE/F) escaped as well."""
    quoted = json.dumps(text, ensure_ascii=False)
    return re.sub("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]", lambda m: f"\\u{ord(m.group()):04x}", quoted)


def card_table(report: dict[str, Any]) -> str:
    """The training run of a report as a model card's table (Markdown): data, schedule, val loss. Shared by the
    version's card and the card of a model merged from it."""
    p, m, d = report["params"], report["metrics"], report["dataset"]

    def loss(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, int | float) else "-"

    per_epoch = m.get("stepsPerEpoch")
    if per_epoch and m["steps"] < per_epoch * p["epochs"]:  # maxSteps ended it: how far it got, cut, not rounded up
        done = m["steps"] * 100 // per_epoch / 100  # in whole hundredths: 29 / 100 is no 0.28
        epochs = f"{done:g} of {counted(p['epochs'], 'epoch')}" + (
            f" (maxSteps {p['maxSteps']})" if p.get("maxSteps") else ""
        )
    else:  # the whole schedule, or a report from before stepsPerEpoch: the epochs begun
        ran = len(report.get("epochs") or []) or p["epochs"]
        epochs = counted(ran, "epoch") + (
            f" of {p['epochs']}" + (f" (maxSteps {p['maxSteps']})" if p.get("maxSteps") else "")
            if ran < p["epochs"]
            else ""
        )

    ranks = int((report.get("dataParallel") or {}).get("ranks") or 1)
    per_step = (  # batchSize counts per process: a step of N processes took N times the batch
        f" on each of {ranks} processes ({ranks * p['batchSize'] * p['gradientAccumulation']} samples a step)"
        if ranks > 1
        else ""
    )
    return (
        "| | |\n|---|---|\n"
        f"| data | tier {d['tier']}, {d['trainSamples']} train and {d['valSamples']} val samples, "
        f"fingerprint {d['fingerprint'][:12]} |\n"
        f"| schedule | {epochs}, {counted(m['steps'], 'step')}, learning rate {p['learningRate']}, batch "
        f"{p['batchSize']} x {p['gradientAccumulation']}{per_step}, rank {p['rank']}, alpha {p['alpha']}, maxSeqLength "
        f"{p['maxSeqLength']}, seed {p['seed']}"
        + (f", resumed after epoch {report['resumedFromEpoch']}" if report.get("resumedFromEpoch") else "")
        + " |\n"
        f"| val loss | {loss(m['valLoss'])} (the base model: {loss(m['baseValLoss'])}) |\n"
    )


def model_card(report: dict[str, Any]) -> str:
    """The version's model card (`registry.CARD_FILE`): what it is, what it was trained on, how it scored, how to load it (PEFT
    writes a card of empty sections). The front matter is the Hub's, as PEFT's card had it."""
    base = report["baseModel"]
    from .models import TINY_ID

    # Where BASE is, for a base no other tool finds by its name (the card names no folder of this machine);
    # a hub model has the commit it was resolved at.
    where = (
        ""
        if base.get("revision")
        else " (BASE: lunatrain's built-in model, in `data/models/luna-tiny` under the data root)"
        if base["id"] == TINY_ID
        else " (BASE: the base model's folder; a relative one is under the data root)"
    )
    return (
        # JSON strings are YAML's too: a base folder named `llama: v2 #1` keeps the front matter readable
        f"---\nbase_model: {yaml_string(str(base['id']))}\nlibrary_name: peft\ntags:\n- lora\n"
        "- lunatrain\n---\n\n"
        f"# {report['adapterName']}@{report['version']}\n\n"
        f"A LoRA adapter for `{base['id']}`, trained by lunatrain on {report['created']}"
        + (f" (job {report['jobId']})" if report.get("jobId") else "")
        + ".\n\n"
        + card_table(report)
        + "\n"
        f"Everything about the run is in `{registry.REPORT_FILE}`, its loss curve in `{registry.LOSS_CURVE_FILE}`, "
        f"the trained samples' hashes in `{registry.TRAIN_HASHES_FILE}`. The tokenizer here carries the chat "
        "template it was trained with.\n\n"
        "Load it with PEFT: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_FOLDER)`"
        f"{where}, and generate with this folder's generation config, which stops at the end of an answer "
        "(`generation_config=GenerationConfig.from_pretrained(THIS_FOLDER)`; PEFT keeps the base's); "
        "or serve it with `lunatrain serve` once active (`lunatrain adapters activate "
        f"{report['adapterName']}@{report['version']} --baseModel {shlex.quote(str(base['id']))}`); `lunatrain merge` "
        "makes a standalone model of it.\n"
    )


def finish(run: Run, report: dict[str, Any], emit: Callable[[Event], None], *, stage: bool = False) -> TrainResult:
    """Write the adapter and its provenance into the work dir, then publish it (version + registry)."""
    from .progress import plot_loss_curve

    p, out = run.params, run.work_dir
    check_root(run)
    # Name the base by what the user called it, not by this machine's cache path, in adapter_config.json; and
    # pin the hub commit trained on, which PEFT's AutoPeftModelForCausalLM loads (without it, whatever the hub
    # holds later). The model card PEFT writes is replaced by our own (`model_card`) when the run is published.
    config = run.model.peft_config["default"]
    config.base_model_name_or_path, config.revision = run.base.id, run.base.revision
    # PEFT holds these as sets and writes them in set order, which follows the process's hash seed: sorted, the
    # same run writes the same adapter_config.json (and a folder's checksum repeats).
    for key in ("target_modules", "exclude_modules"):
        if isinstance(getattr(config, key, None), set):
            setattr(config, key, sorted(getattr(config, key)))
    with peft_quiet(UserWarning):
        run.model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=saves_embeddings(run.model))
    # The tokenizer with the template trained on (and any added markers) and a generation config that stops
    # on the terminator travel with the adapter: inference needs exactly these to stop where training taught.
    from .templates import write_generation_config

    run.tokenizer.save_pretrained(str(out))
    write_generation_config(out, run.base.path, run.tokens.terminator, run.tokenizer)
    give_umask_modes(out)  # safetensors wrote the weights 0600
    hashes = sorted({e.hash for e in trained_samples(run) if e.hash})
    atomic_write_bytes(out / registry.TRAIN_HASHES_FILE, "".join(h + "\n" for h in hashes).encode())
    plot_loss_curve(out / registry.LOSS_CURVE_FILE, run.curve, run.epochs, run.base_val_loss, title=p.adapter_name)
    entry = {
        "jobId": report["jobId"],
        "status": "succeeded",
        "strategy": p.adapter_strategy,
        "baseModel": report["baseModel"],
        "datasetTier": p.dataset_tier,
        "datasetFingerprint": run.data.fingerprint,
        "params": report["params"],
        "metrics": {k: report["metrics"][k] for k in ("valLoss", "baseValLoss", "trainLoss")},
        "tokenizerHash": report["tokenizerHash"],
        "templateHash": report["templateHash"],
        "runKey": report["runKey"],
        "trainedKey": report["trainedKey"],
        "trainSamples": len(run.train),
        "resumedFromEpoch": run.resumed_from,  # `adapters show` and `diff` tell a resumed version from a fresh one
        "gate": None,
        "quantization": report["quantization"],
    }

    def write_report(final: dict[str, Any]) -> None:
        report.update(
            version=final["version"], revision=final.get("revision"), path=final["path"], created=final["created"]
        )
        atomic_write_bytes(out / registry.REPORT_FILE, dumps_json(report).encode())
        atomic_write_bytes(out / registry.CARD_FILE, model_card(report).encode())  # in place of PEFT's card

    entry = registry.publish(run.settings, p.adapter_name, p.adapter_strategy, out, entry, write_report, stage=stage)
    try:
        registry.write_latest(run.settings, report)
    except LunaError as err:  # published: the registry holds the run, and its gate is still to come
        said = (
            f"{p.adapter_name}@{entry['version']} is registered, but the latest report was not written: {err.message}"
        )
        emit({"type": "log", "message": said, **coded("log.latest_report_unwritten", message=err.message)})
    # An example deleted after the export this run trained on marked only the versions that existed then: this
    # one is marked now, not only by a later `adapters repair` (the registry would say two things about it).
    with contextlib.suppress(LunaError):  # a store that cannot be read now: the adapter is published all the same
        registry.refresh_stale(run.settings)
    # Published: only now are the epoch checkpoints (the resume point if publishing had failed) and older
    # failed tries of this same run of no further use; the adapter itself is the final state.
    path = registry.adapter_dir(run.settings, entry)
    shutil.rmtree(path / checkpoints.CHECKPOINTS_DIR, ignore_errors=True)
    for stale in out.parent.glob(f"{out.name.rsplit('-', 1)[0]}-*"):
        if any(not checkpoints.same_world(s, run.world.size) for s in checkpoints.run_states(stale)):
            continue  # another number of processes' run: those resume it (`_work_dir`)
        shutil.rmtree(stale, ignore_errors=True)
    emit(
        {
            "type": "log",
            "message": f"adapter {p.adapter_name}@{entry['version']} written to {entry['path']}",
            **coded("log.adapter_written", name=p.adapter_name, version=entry["version"], path=entry["path"]),
        }
    )
    return TrainResult(Status.SUCCEEDED, p.adapter_name, entry["version"], path, report, None, run.data)
