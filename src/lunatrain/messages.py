"""Every machine-readable message code the server can emit, in one registry.

The API sends a code and its parameters beside each English sentence the dashboard shows: errors
(`error.code`, `error.params`), preflight checks (`checks[].code`, `.params`), eval-gate reasons
(`reasonCodes`), an adapter version's state (`state.code`) and job log lines (`code`, `params`). The
dashboard says the same in the reader's language from `msg.<code>` in api/static/i18n.js; a test checks
that every code here has a German and an English text there, and that the sources use no code missing here.
Values: what the code means, for readers of the API docs.
"""

from __future__ import annotations

from typing import Any


def counted(n: int, one: str, many: str | None = None) -> str:
    """`n` and a noun in the English sentences beside the codes: "1 version", "2 versions" (`many`: a plural
    that is not `one` + "s")."""
    return f"{n} {one if n == 1 else many or one + 's'}"


CODES: dict[str, str] = {
    # errors (error.code): the class codes of errors.py, the HTTP layer's, and specific ones
    "error": "a failure without a more specific code",
    "invalid_request": "the request or a parameter is invalid (the message names it)",
    "check_failed": "a data check or the eval gate did not pass",
    "not_found": "the named resource does not exist",
    "conflict": "the request conflicts with the current state",
    "service_unavailable": "the trainer service cannot be reached",
    "bad_request": "malformed request",
    "unauthorized": "bearer token missing or wrong",
    "method_not_allowed": "the path does not accept this method",
    "payload_too_large": "request body over the size cap",
    "request_timeout": "the request body did not arrive in time",
    "storage_folder_in_place": "a folder stands where the data root keeps a file: remove or rename it (path)",
    "storage_no_access": "a file of the data root cannot be read by this user (path)",
    "storage.root_moved": "the data root was moved or replaced while the run trained: nothing more was written there",
    "unsupported_media_type": "the body is not sent as application/json",
    "internal": "unexpected server error",
    "bad_host": "Host header not in ASSISTANT_ALLOWED_HOSTS",
    "forbidden_origin": "cross-origin request refused",
    "export.missing": "a step needs the export and there is none yet (dir)",
    "checkpoint.damaged": "a checkpoint to resume from is damaged; train without --resume or remove it (checkpoint, file, reason)",
    "export.nothing_to_train": "an export wrote a tier whose samples all fell into val/test (tier, count, valRatio, "
    "testRatio)",
    "export.summary_unreadable": "the export's summary cannot be read; exporting again writes it (path, reason)",
    "train.no_samples": "the dataset tier has no training samples in the export (tier)",
    "train.special_tokens": "samples hold a literal special token in their text: the run is refused (count, tier, examples)",
    "train.over_context": "samples longer than the base model's context, kept by maxSeqLength: refused (count, context, maxSeqLength)",
    "train.resume_busy": "another process is training this run from its checkpoint: a second resume is refused (path)",
    "train.already_finished": "a resume of a run that already finished as a version: nothing is trained (name, version)",
    "eval.no_suite_file": "data/eval holds files but no golden suite file (*.jsonl) (dir, files)",
    "device.no_cuda": "device cuda was asked for and no CUDA GPU is available",
    "gate.several_active": "several adapters are active on the base model and none was named (adapters, baseModel)",
    "base_model.is_adapter": "baseModel names a LoRA adapter directory, not a base model (baseModel)",
    "base_model.not_a_model": "baseModel names no model this API may use: not luna-tiny, a hub id or a model "
    "directory under the data root (baseModel)",
    "base_model.outside_root": "baseModel is a path outside the data root (baseModel, home)",
    "base_model.no_directory": "baseModel is written as a path and no such directory exists (baseModel)",
    "base_model.a_file": "baseModel is written as a path that is a file, not a model's folder (baseModel)",
    "base_model.unknown_form": "baseModel is neither luna-tiny, a local directory nor a hub id (baseModel)",
    "base_model.no_config": "the base model's directory has no config.json (baseModel, path)",
    "base_model.no_weights": "the base model's directory has no safetensors weights (baseModel, path)",
    "base_model.unsafe_index": "the base model's weights index names files that are not safetensors in it (baseModel, problem)",
    "base_model.custom_code": "the base model needs its own Python code, never run (baseModel, modelType)",
    "base_model.no_index": "the base model's shards lack their model.safetensors.index.json (baseModel, path, files)",
    "base_model.unknown_type": "the base model's model_type is unknown to transformers (baseModel, modelType)",
    "base_model.not_causal_lm": "transformers cannot load the base model's model_type as a causal language model "
    "(baseModel, modelType)",
    "base_model.stored_quantized": "the base is stored quantized by bitsandbytes; runs on it take that quantize "
    "(baseModel, stored, quantize)",
    "base_model.quantized_method": "the base is stored quantized by a method lunatrain does not train on "
    "(baseModel, method)",
    "merge.quantized_base": "a merge needs full-precision base weights; this base is stored quantized "
    "(baseModel, method)",
    "lora.experts_dropout": "LoRA on a mixture's experts takes no dropout (baseModel, dropout, attention: its attention "
    "layers' names)",
    "base_model.no_fast_tokenizer": "the base model has no tokenizer.json (baseModel, path)",
    "base_model.no_vocabulary": "the base model's tokenizer has no vocabulary (baseModel, path)",
    "base_model.not_cached": "a hub id not in the local Hugging Face cache, and no download allowed (baseModel; folder: that "
    "folder under the data root, gone)",
    "adapter.version_not_active": "the named version is active on no base model (name, version)",
    "adapter.version_not_active_here": "the named version is not active on the configured base model (name, version)",
    "adapter.not_active": "the adapter is not active where it was asked (name, version: null)",
    "adapter.no_earlier_version": "rollback: no earlier active version on this base model (name)",
    "adapter.rollback_files_missing": "rollback: the version it would return to has lost its files (name, version, files)",
    "adapter.rollback_moved": "rollback of a version that is no longer the active one (name, version, active)",
    "adapter.rollback_target_moved": "rollback that would return to another version than shown (name, to, target)",
    "adapter.slot_other_base": "an overwrite run on another base model than the run the slot holds is refused "
    "(name, slotBase, baseModel)",
    "adapter.does_not_fit": "the adapter's LoRA weights have other shapes than the base model's layers: not "
    "even --force makes it active there, and a gate cannot use it as its baseline (name, version, baseModel, "
    "configured when activating)",
    "adapter.another_build": "activation refused: trained on another build (revision) of the configured base "
    "model (name, version, baseModel, configured)",
    "adapter.foreign_base": "activation refused: trained on another base model than the configured one "
    "(name, version, baseModel, configured)",
    "template.refuses_example": "the chat template raised on an example (example, reason)",
    "profile.invalid_toml": "a profile file is no valid TOML (path, reason)",
    "adapter.damaged": "chat: an adapter version's files cannot be loaded onto the base model (model, why)",
    "merge.base_of_others": "merging again would give a merged model other versions are trained on other "
    "weights (target, adapters, count)",
    # chat endpoint errors (/v1/…, OpenAI's error shape: error.type and error.code)
    "invalid_request_error": "chat: the request is invalid (the message names the parameter)",
    "authentication_error": "chat: bearer token missing or wrong",
    "permission_error": "chat: the request is not allowed from here",
    "rate_limit_error": "chat: all answer slots are busy; retry shortly",
    "rate_limit_exceeded": "chat: all answer slots are busy; retry shortly",
    "server_error": "chat: the answer failed on the server",
    "model_not_found": "chat: no such model is served here (missing: the files a listed version lacks, when that is why)",
    "model_base_mismatch": "chat: the adapter was trained on another base model than the one served",
    "base_model_unavailable": "chat: the configured base model (ASSISTANT_BASE_MODEL) cannot be found or loaded",
    "invalid_messages": "chat: the chat template refuses the messages, or one contains a special token of the model",
    "chat.special_token": "chat: a message holds a special token of the model as text (message: its index, token)",
    "context_length_exceeded": "chat: the messages and max_tokens exceed the model's context (chars or tokens, maxTokens where it was the excess, context)",
    "invalid_value": "chat: a parameter has an invalid value",
    "unsupported_parameter": "chat: a parameter this server does not serve (tools, functions, logit_bias)",
    "unsupported_value": "chat: a value this server cannot answer (tool_choice, response_format, logprobs)",
    # job errors (job.error.code)
    "nan_loss": "the loss or gradient norm became non-finite",
    "cancelled": "the job was cancelled",
    "save_failed": "the adapter could not be written",
    "out_of_memory": "the device ran out of memory",
    "training_error": "training failed",
    "rank_peer_lost": "another of the data-parallel training processes failed (ranks), so this one stopped too",
    "trainer_error": "internal trainer error",
    "interrupted": "the training process stopped early",
    "child_start_failed": "the training process could not be started",
    "child_crashed": "the training process crashed (params.detail says how: one of the crash.* codes)",
    # how a crashed job's processes ended (child_crashed's params.detail); every one names the job's log
    # why the trainer cannot be reached or started (error.params.detail of service_unavailable)
    "trainer.on_demand_off": "the trainer is not running and starting it on demand is off",
    # "held": by another service or another data root's trainer
    "trainer.address_held_off": "the trainer's address is held and starting it on demand is off (url)",
    "trainer.address_held": "the trainer's address is held; the next job starts this root's trainer on a free port (url)",
    "trainer.address_held_chosen": "the trainer address set in ASSISTANT_LORA_TRAINER_URL is held (url)",
    "trainer.unreachable": "the trainer does not answer",
    "trainer.start_failed": "the trainer's start command could not be run (why)",
    "trainer.exited_starting": "the trainer exited while starting (status, log)",
    "trainer.refused_start": "the trainer refused to start, saying why in one sentence (status, why, log)",
    "trainer.start_timeout": "the trainer did not become healthy in time (seconds, log)",
    "job.already_succeeded": "a cancel of a job that already succeeded (jobId)",
    "job.already_failed": "a cancel of a job that already failed (jobId)",
    "trainer.no_device": "the trainer could not probe its device and runs no job until a later probe works (why)",
    "trainer.updating": "the trainer is stopping to start again with lunatrain's updated code",
    "trainer.update_timeout": "the trainer runs code from before an update and did not stop in time (seconds)",
    "crash.oom": "killed by SIGKILL, often the system's out-of-memory killer (log)",
    "crash.signal": "killed by a signal (signal, log)",
    "crash.status": "exited without a result (status, log)",
    "crash.rank.oom": "one rank of a data-parallel job killed by SIGKILL (rank, ranks, log)",
    "crash.rank.signal": "one rank of a data-parallel job killed by a signal (rank, ranks, signal, log)",
    "crash.rank.status": "one rank of a data-parallel job exited without a result (rank, ranks, status, log)",
    "crash.launcher.oom": "torchrun's launcher killed by SIGKILL (ranks, log)",
    "crash.launcher.signal": "torchrun's launcher killed by a signal (ranks, signal, log)",
    "crash.launcher.status": "torchrun's launcher exited without a result (ranks, status, log)",
    "disk_full": "the data root's disk is full",
    "storage_out_of_files": "this process can open no further file (too many at once); try again (path)",
    "storage_busy": "another process holds the database; try again when it is done",
    "storage_unreachable": "the database server cannot be reached",
    "storage_denied": "the database refuses this user something lunatrain needs (a privilege, a schema, writing)",
    "storage_incompatible": "the database cannot be used as it is (made by a newer lunatrain, or not UTF8)",
    "registry_unreadable": "the adapter registry file cannot be read; it is left untouched (adapters repair) (path, reason)",
    "storage_error": "the data root's storage failed (I/O error or a damaged database)",
    "data_root_gone": "the data root was moved or deleted while the API ran; start it again where it is now",
    # an adapter version's state (state.code): active, or why not; params always name, version, baseModel
    "adapter.active": "active on the configured base model",
    "adapter.active_unserved": "active on this base model, which is not the configured one",
    "adapter.replaced": "a newer revision replaced this slot",
    "adapter.not_kept": "an overwrite revision the slot never held: the gate refused it, or its run ended unjudged",
    "adapter.active_on_other_base": "active on another base model (activeOn)",
    "adapter.other_base": "trained on another base model (baseModel)",
    "adapter.base_changed": "the configured base model has the same id but other weights than when it was trained (baseModel)",
    "adapter.activated_base_changed": "force-activated on an earlier build of the configured base (activeOn), trained on another (baseModel)",
    "adapter.gate_failed": "the eval gate refused it (reasons)",
    "adapter.other_version_active": "another version of the adapter is active (name, activeVersion)",
    "adapter.deactivated": "passed the gate, later deactivated or replaced by an activation",
    "adapter.not_gated": "never gated, never activated",
    "adapter.files_missing": "its files are gone from data/adapters, so it can be neither activated nor served (missing)",
    "adapter.files_gone": "a version's files are gone from data/adapters: refused to load it (name, version, missing)",
    # why a dataset tier is not ready (status tiers.<tier>.code)
    "tier.too_few_curated": "fewer approved curated examples than minCurated (curated, minCurated)",
    "tier.no_samples": "no approved samples for the tier (tier)",
    "tier.no_train_sample": "the current export's tier has no train sample, all are in val or test (tier)",
    # eval-gate reasons (reasonCodes[].code); `shown` holds some values as the English sentence writes them (as
    # many decimals as it takes to tell a value from its limit), for a reader to show the same digits
    "gate.below_minimum": "golden pass rate below the absolute minimum (rate, minimum, shown)",
    "gate.loss_not_finite": "a loss is not a finite number (split, loss)",
    "gate.loss_vs_base": "loss above the allowed ratio to the base model's (split, loss, ratio, baseLoss, allowed, shown)",
    "gate.pass_rate_regression": (
        "golden pass rate dropped against the baseline (rate, baseline, baselineRate, allowedDrop, shown)"
    ),
    "gate.loss_regression": (
        "loss rose against the baseline (split, loss, baseline, baselineLoss, allowed, allowedPercent, risePercent, shown)"
    ),
    # eval-gate notes (noteCodes[].code): what the decision rests on besides the numbers; `why`, `reasons` and
    # `trained` are English phrases (from an error, the reasons' sentences, "unquantized"/"in 4bit")
    "gate.case_left_out": "a golden case was left out: the chat template refuses its system message (case, source, why)",
    "gate.baseline_measured_again": "the active version's gate record did not fit this gate, so it was measured again (ref, changed, changedKeys)",
    "gate.case_special_token": "a golden case was left out: it holds a special token of the model (case, source, token, message)",
    "gate.chose_luna_adapter": "several adapters are active on the base model: luna-adapter was gated (baseModel, adapters)",
    "gate.other_base": "the candidate was trained on another base model and gated on it (ref, baseModel, trainedOn)",
    "gate.other_base_forced": "the candidate is active on the base model by --force, trained and gated on another (ref, baseModel, trainedOn)",
    "gate.cancelled": "passed, not activated: the job was cancelled while the gate ran",
    "gate.revision_gone": "passed, not kept: the overwrite revision no longer exists (revision)",
    "gate.already_active": "passed; it was already the active version",
    "gate.replaced_revision": "passed and replaced the active revision of the same version (ref, revision)",
    "gate.not_activated": "passed, but the activation was refused (why)",
    "gate.stale": "passed, not activated: examples it was trained on were deleted meanwhile (retrain needed)",
    "gate.baseline_moved": "passed, not activated: another version became active while it was judged (judged, active, ref)",
    "gate.baseline_moved_slot": "passed, not kept: another version became active while the overwrite revision was judged (judged, active, ref)",
    "gate.baseline_gone": "passed, not activated: the version it was judged against was deactivated meanwhile (judged, ref)",
    "gate.baseline_gone_slot": "passed, not kept: the version the overwrite revision was judged against was deactivated meanwhile (judged, ref)",
    "gate.stays_inactive": "refused: the version stays registered but inactive (reasons)",
    "gate.report_not_written": "decided and recorded, but the report file was not written (why)",
    "gate.own_baseline": "the candidate is the active version, so the base model is the baseline (ref)",
    "gate.baseline_quantized": "the active version, trained otherwise, was measured on the quantized base (ref, trained, quantize)",
    "gate.baseline_unusable": "the active version cannot judge and has no comparable record: the base model is the baseline (ref, why)",
    "gate.unquantized": "the base model was loaded unquantized, not as the adapter trained (quantize, why)",
    "gate.no_export": "no export: losses on val/test were not measured",
    "gate.no_eval_samples": "the tier's export has no val or test samples: losses were not measured (tier)",
    "gate.eval_samples_cut": "every sample of these splits has its answer beyond maxSeqLength: no loss measured "
    "(splits: val, test or val/test, maxSeqLength)",
    "gate.candidate_trained_on_eval": "val/test samples the gate measures the candidate on are in its training data "
    "(ref, count, total)",
    "gate.baseline_trained_on_eval": "val/test samples the gate measures the active version (the baseline) on are in "
    "its training data: the comparison favours it (ref, count, total)",
    "gate.no_change": "the adapter's measured losses are the base model's: its training changed nothing (ref, "
    "splits: val, test or val/test, split: the first of them, loss: its loss, shown.loss: as written)",
    # preflight checks (checks[].code): check.<id>.<outcome>
    "check.export_summary.ok": "every file matches the export summary",
    "check.export_summary.mismatch": "files differ from the export summary (count)",
    "check.export_summary.replaced": "files of the tier in data/training were saved over their links to the export (count)",
    "check.malformed_record.ok": "no malformed lines",
    "check.malformed_record.found": "lines are not valid chat records (count)",
    "check.export_stale.no_database": "no database here; the export is checked as it is",
    "check.export_stale.ok": "the export is up to date with the database",
    "check.export_stale.changed": "the database changed since the last export",
    "check.export_stale.deleted": "samples in the export were deleted from the database since (count)",
    "check.export_stale.rejected": "samples in the export were rejected since (count)",
    "check.export_stale.withdrawn": "samples in the export were deleted or rejected since (count, deleted, rejected)",
    "check.volume.ok": "enough approved curated examples (curated, minCurated)",
    "check.volume.too_few": "fewer approved curated examples than minCurated (curated, minCurated)",
    "check.volume.none": "no approved curated examples yet; names the commands that add some (minCurated)",
    "check.empty_train.ok": "train samples in the tier (count)",
    "check.empty_train.empty": "the tier's train split is empty",
    "check.empty_response.ok": "no empty responses",
    "check.empty_response.found": "samples with an empty assistant response (count)",
    "check.trivial_response.ok": "no trivial responses",
    "check.trivial_response.found": "samples with a trivial response (count)",
    "check.template_refused.ok": "the chat template renders every example",
    "check.template_refused.found": "examples the chat template refuses (count, reason: the first one's)",
    "check.special_tokens_in_content.ok": "no special tokens inside message text",
    "check.special_tokens_in_content.found": "samples contain a literal special token (count)",
    "check.duplicate_exact.ok": "no exact duplicates",
    "check.duplicate_exact.found": "repeated samples within a split (count)",
    "check.duplicate_across_splits.ok": "no hash in two splits",
    "check.duplicate_across_splits.found": "hashes in more than one split (count)",
    "check.exchange_across_splits.ok": "no exchange in train and in val/test",
    "check.exchange_across_splits.found": "val/test samples holding an exchange a train sample of another conversation trains (count)",
    "check.duplicate_normalized.ok": "no normalized duplicates",
    "check.duplicate_normalized.found": "near-duplicates after folding case and punctuation (count)",
    "check.conflicting_answers.ok": "no question with different answers",
    "check.conflicting_answers.found": "samples answer the same question differently (count)",
    "check.over_context.ok": "no sample longer than the base model's context (context, maxSeqLength)",
    "check.over_context.found": "samples longer than the base model's context, kept by maxSeqLength (count, context, maxSeqLength)",
    "check.truncated.ok": "no sample exceeds maxSeqLength (maxSeqLength)",
    "check.truncated.found": "samples longer than maxSeqLength (count, maxSeqLength)",
    "check.no_trained_tokens.ok": "every sample has trained tokens",
    "check.no_trained_tokens.found": "samples without a trained token after masking (count)",
    "check.terminator.stops": "the turn terminator the template emits after each answer is trained; the base "
    "model's generation_config stops on it (terminator)",
    "check.terminator.shipped": "the turn terminator is trained; adapters and merged models ship a "
    "generation_config that stops on it (terminator)",
    "check.memory_plan.fits": "the job fits the device's memory (needGiB, budgetGiB)",
    "check.memory_plan.too_big": "the job does not fit the device's memory (needGiB, budgetGiB); it would fit with "
    "these options (suggestion)",
    "check.memory_plan.too_big_any": "the job does not fit the device's memory (needGiB, budgetGiB), and no option "
    "makes it fit: a smaller base model or a device with more memory",
    "check.eot_not_trained.ok": "the end-of-turn token is trained",
    "check.eot_not_trained.found": "samples whose end-of-turn token is outside the loss mask (count)",
    "check.terminator.several_tokens": "the turn terminator is several tokens; no generation stops on it "
    "(terminator, tokens)",
    "check.system_dropped.ok": "the chat template keeps each sample's system message",
    "check.system_dropped.found": "samples whose system message the template leaves out of training (count)",
    "check.reasoning_dropped.ok": "the chat template keeps the reasoning of each sample's last answer",
    "check.reasoning_dropped.found": "samples whose last answer's <think> reasoning the template drops (count)",
    "check.generation_prompt.differs": "the generation prompt opens what training never puts before an answer (gap)",
    "check.val_too_small.ok": "val samples (count)",
    "check.val_too_small.empty": "the val split is empty although its ratio is above 0 (ratio)",
    "check.val_too_small.few": "too few val samples for a meaningful loss (count, minimum)",
    "check.token_stats.info": "train token statistics (minLength, medianLength, p95Length, maxLength, "
    "supervisedTokens, tokens)",
    "check.estimate.measured": "steps and time, from the last job's speed (steps, seconds, device)",
    "check.estimate.computed": "steps and time, estimated from model size (steps, seconds, device)",
    "status.jobs_db_no_access": "the trainer's job database cannot be read by this process (path, reason)",
    "status.jobs_db_damaged": "the trainer's job database is damaged (path, reason)",
    "status.jobs_db_busy": "the trainer's job database is locked by another process (path, reason)",
    "status.jobs_db_empty": "the trainer's job database holds no job table (path, reason)",
    "status.jobs_db_disk_full": "the trainer's job database cannot be read while its disk is full (path, reason)",
    "status.jobs_db_folder": "the trainer's job database is a folder, not a file (path)",
    "status.no_database": "no database, so the counts are 0 and the export cannot be compared (db)",
    "status.job_without_trainer": "a job is recorded as running but no trainer holds the data root (jobId, status)",
    "status.registry_unreadable": "the adapter registry is damaged or missing; a repair rebuilds it (path)",
    "status.registry_no_access": "the adapter registry cannot be read by this process (path, reason)",
    "status.registry_error": "the adapter registry cannot be read for another reason (path, reason)",
    "status.export_unreadable": "the last export's summary cannot be read; exporting again writes it (path, reason)",
    "status.report_unreadable": "a stage's last report is damaged or of another shape; running the stage again "
    "writes it anew (path, reason, command)",
    "status.base_model_unusable": "the configured base model cannot be used; the active adapter is a guess (reason)",
    "status.api_outdated": "lunatrain was updated since this API server started; restart `lunatrain serve`",
    "status.profile_unusable": "the user's luna profile does not load; the bundled one's minCurated stands in "
    "(path, reason, minCurated)",
    "status.profile_broken": "the user's luna profile does not load, so `lunatrain luna` refuses to run (path, reason)",
    "check.estimate.measured_ranks": "steps and time on the trainer's processes, from the last job's speed, and a "
    "local run's steps (steps, seconds, device, ranks, localSteps)",
    "check.estimate.computed_ranks": "steps and time on the trainer's processes, estimated from model size, and a "
    "local run's steps (steps, seconds, device, ranks, localSteps)",
    # job log lines (events of type log: code, params)
    "log.training_started": "training begins (samples, steps, device)",
    "log.max_steps_beyond": "maxSteps is beyond the schedule's steps (maxSteps, steps, epochs): the run ends after them",
    "log.epoch_done": "an epoch ended with a checkpoint (epoch, valLoss)",
    "log.epoch_done_no_val": "an epoch ended with a checkpoint, without a validation split (epoch)",
    "log.adapter_written": "the adapter was written (name, version, path)",
    "log.latest_report_unwritten": "the version is registered, but lora-latest.json could not be written (message)",
    "log.samples_left_out": (
        "samples without an answer token within maxSeqLength are left out (train, trainTotal, val, valTotal, "
        "maxSeqLength)"
    ),
    "log.training_ended": "training ended (status, message)",
    "log.resume_fresh": "no checkpoint to resume from",
    "log.resume_other_run": "the adapter's furthest checkpoint (checkpoint, epoch) is of another run: differs names the parts (params, data, base, tokenizer, template, ranks: another number of training processes); starting fresh",
    "log.resumed": "resumed from a checkpoint (epoch, step)",
    "log.gate_started": "the eval gate runs on the new version (name, version)",
    "log.gate_passed": "the eval gate passed (name, version, promoted)",
    "log.gate_failed": "the eval gate refused the new version (name, version, reasons, reasonCodes)",
    "log.worker_started": "the job's process started (pid)",
    "log.rank_started": "one process of a data-parallel job started (pid, rank, size)",
}


class Note(str):
    """A sentence with its message code: it reads, joins and compares as the English text (the command line
    prints it), and carries {code, params} in `coded` for a reader in another language."""

    coded: dict[str, Any]

    def __new__(cls, code: str, text: str, **params: Any) -> Note:
        note = super().__new__(cls, text)
        note.coded = coded(code, **params)
        return note

    def __getnewargs_ex__(self) -> tuple[tuple[str, str], dict[str, Any]]:  # copy and pickle build it again
        return (self.coded["code"], str(self)), dict(self.coded["params"])


def coded(code: str, **params: Any) -> dict[str, Any]:
    """{"code", "params"} for a message; an unknown code is a programming error, caught by any test that
    reaches it."""
    if code not in CODES:
        raise KeyError(f"message code {code!r} is not registered in lunatrain.messages.CODES")
    return {"code": code, "params": params}
