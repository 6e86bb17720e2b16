// The training dashboard: provider label, data status, the LoRA form with live job progress, and the adapter
// registry. Plain ES modules against the assistant API (docs/api.md); no build step.

import { api, setToken, sendable, onUnauthorized, FINAL_STATES } from "./api.js";
import { AdapterView } from "./adapters.js";
import { LoraForm } from "./form.js";
import { t, tMsg, errorText, lang, translatePage, formatDate, formatNumber, formatPlain } from "./i18n.js";
import { JobView } from "./job.js";
import { TryPanel } from "./tryit.js";
import { serverFieldErrors, checkField, FIELDS } from "./params.js";
import { h, showError, showNotice, clearErrors, clearErrorsOf, busy, fillFacts, turns, released } from "./ui.js";

const HEALTH_MS = 15000;
const DATA_MS = 15000;
const $ = (id) => document.getElementById(id);

// ---- provider (header) -------------------------------------------------------------------------------

function providerState(health) {
  if (health.cudaAvailable) return "cuda";
  if (health.reachable === false || health.status === "offline" || health.label === "Offline") return "offline";
  // It answers, but could not probe its device and runs no job until restarted (trainer.no_device).
  if (health.device?.type === "unknown") return "nodevice";
  return "cpu";
}

function renderHealth(health) {
  const state = providerState(health);
  const apiDown = Boolean(health.apiDown); // the page's own server did not answer: no trainer to start from here
  const badge = $("provider-label");
  // The label comes from the server verbatim: it is the guide's wording and the same in both languages. The
  // badge is a status region: written only when it changes, so a background poll says nothing new.
  const label = health.label ?? (state === "offline" ? "Offline" : state);
  if (badge.textContent !== label) badge.textContent = label;
  badge.dataset.state = state;
  const details = [];
  if (state === "nodevice") {
    const why = String(health.device?.name ?? "").replace(/^device probe failed: /, "");
    details.push(t("provider.noDevice", { why }));
  } else if (state !== "offline") {
    // The trainer's device: {type: "cpu"|"cuda", name, memoryTotal (bytes), bf16}.
    const dev = health.device ?? {};
    const name = [dev.type?.toUpperCase(), dev.name].filter(Boolean).join(" ");
    if (name) details.push(`${t("provider.device")}: ${name}`);
    if (dev.memoryTotal) details.push(`${t("provider.memory")}: ${formatNumber(dev.memoryTotal / 2 ** 30, 1)} GiB`);
    if (typeof dev.bf16 === "boolean") details.push(`${t("provider.bf16")}: ${t(dev.bf16 ? "yes" : "no")}`);
  } else {
    // Point to this page's own button, not to a command-line flag (the server's sentence names those).
    details.push(t(apiDown ? "provider.apiDown" : "provider.offlineHint"));
  }
  $("provider-device").textContent = details.join(" · ");
  $("trainer-start").hidden = state !== "offline" || apiDown;
}

/** `background`: the periodic refresh, not a click (its error gives way to a click's, see showError). */
async function loadHealth(ensureTrainer = false, background = false) {
  try {
    const health = await api.health(ensureTrainer);
    renderHealth(health);
    clearErrors("network"); // the server answered: "cannot be reached" is no longer true, whichever panel said it
    if (providerState(health) !== "offline") clearErrors("service_unavailable");
    return health;
  } catch (error) {
    if (error.status === 401) return null; // request() has asked for the token (onUnauthorized)
    renderHealth({ label: "Offline", reachable: false, apiDown: error.code === "network", error: error.message });
    showError(error, t("provider.heading"), { background });
    return null;
  }
}

async function startTrainer() {
  const button = $("trainer-start");
  await busy(button, t("provider.starting"), async () => {
    const health = await loadHealth(true);
    if (health && providerState(health) !== "offline") {
      showNotice(t("provider.started", { label: health.label }));
      if (!jobView.jobId) loadLatestJob(); // the job panel could not ask while the trainer was down
    }
  });
  if (!button.hidden) button.focus();
  else $("provider-refresh").focus();
}

// ---- token (only when the API runs with ASSISTANT_API_TOKEN) ------------------------------------------

function askToken() {
  // Every panel needs the token, the trainer's status too: the label says so instead of "checking" for good.
  const badge = $("provider-label");
  badge.textContent = t("provider.locked");
  badge.dataset.state = "locked";
  $("provider-device").textContent = t("msg.unauthorized");
  $("trainer-start").hidden = true;
  const form = $("token-form");
  if (form.hidden) {
    form.hidden = false;
    const field = $("api-token");
    if (tokenTried) {
      // The token given was refused: said at the field, and announced (the error is an alert).
      const error = $("api-token-error");
      error.textContent = t("token.refused");
      error.hidden = false;
      field.setAttribute("aria-invalid", "true");
      field.setAttribute("aria-describedby", "api-token-error");
    }
    field.focus();
  }
  return null;
}

let tokenTried = false; // a token was given: a 401 now means it was refused, not that none is known yet

onUnauthorized(askToken);

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("api-token").value.trim();
  if (token && !sendable(token)) {
    // Said at the field, nothing sent: the browser could not send it, and would say the server is unreachable.
    const error = $("api-token-error");
    error.textContent = t("token.unsendable");
    error.hidden = false;
    $("api-token").setAttribute("aria-invalid", "true");
    $("api-token").setAttribute("aria-describedby", "api-token-error");
    $("api-token").focus();
    return;
  }
  setToken(token);
  tokenTried = true;
  $("api-token-error").hidden = true;
  $("api-token").removeAttribute("aria-invalid");
  $("api-token").removeAttribute("aria-describedby");
  $("token-form").hidden = true;
  $("main").focus(); // the form's field had the focus: it goes on to the page, not to its body
  clearErrors();
  refreshAll();
});

// ---- data status, export, prepare ----------------------------------------------------------------------

const SOURCES = ["curated", "memory", "conversation"];
const STATUSES = ["approved", "pending", "rejected"];
// The form's minCurated, with the bounds the server has for it too.
const MIN_CURATED_FIELD = FIELDS.find((f) => f.name === "minCurated");

/** The threshold the user set, or undefined (the server's default) while the field holds no whole number ≥ 0. */
function minCurated() {
  // Read as the form reads its own minCurated: "1.000" is a thousand on the German page, not one.
  const [value, error] = checkField(MIN_CURATED_FIELD, $("data-min-curated").value);
  return error || value === null ? undefined : value;
}

/** The threshold for an action the user asked for: marked and focused when it is not a whole number ≥ 0
 * (a value the panel would otherwise replace by another without saying so); null then. */
function checkedMinCurated() {
  const input = $("data-min-curated");
  const error = $("data-min-curated-error");
  const value = minCurated();
  const invalid = value === undefined;
  error.textContent = invalid
    ? t("data.minInvalid", { min: formatNumber(MIN_CURATED_FIELD.min), max: formatNumber(MIN_CURATED_FIELD.max) }) : "";
  error.hidden = !invalid;
  if (invalid) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return null;
  }
  input.removeAttribute("aria-invalid");
  return value;
}

function renderDataStatus(status) {
  const counts = status.examples ?? {};
  const table = $("counts-table");
  table.tHead.replaceChildren(h("tr", {}, h("th", { scope: "col" }, t("data.source")),
    STATUSES.map((s) => h("th", { scope: "col", class: "num" }, t(`status.${s}`))),
    h("th", { scope: "col", class: "num" }, t("data.total"))));
  // Memory items (facts the assistant remembers) are counted apart from examples; they become samples on export.
  const rows = { ...counts, ...(status.memoryItems ? { memoryItems: status.memoryItems } : {}) };
  const sources = [...new Set([...SOURCES, ...Object.keys(rows)])];
  table.tBodies[0].replaceChildren(...sources.map((source) => {
    const row = rows[source] ?? {};
    const total = row.total ?? STATUSES.reduce((sum, s) => sum + (Number(row[s]) || 0), 0);
    return h("tr", { dataset: { source } }, h("th", { scope: "row" }, t(`source.${source}`)),
      STATUSES.map((s) => h("td", { class: "num" }, formatNumber(row[s] ?? 0))),
      h("td", { class: "num" }, formatNumber(total)));
  }));

  const curated = status.curatedApproved ?? counts.curated?.approved ?? 0;
  const min = status.minCurated ?? minCurated();
  const ready = $("data-ready");
  ready.dataset.ready = status.ready ? "yes" : "no";
  // A live region: written only when its sentence changes, or a screen reader reads it again at every refresh.
  const sentence = t(status.ready ? "data.ready" : "data.notReady", { curated: formatNumber(curated), min: formatNumber(min) });
  if (ready.textContent !== sentence) ready.textContent = sentence;

  const exp = status.lastExport;
  const job = status.lastJob;
  const active = status.activeAdapter;
  const changed = status.changedSinceExport ?? exp?.changedSince;
  fillFacts($("data-facts"), [
    // An export whose summary cannot be read exists: "unknown" (the problem below says why), not "never".
    [t("data.lastExport"), exp ? formatDate(exp.time ?? exp.exportedAt ?? exp.createdAt)
      : t((status.problemCodes ?? []).some((c) => c?.code === "status.export_unreadable") ? "unknown" : "data.never")],
    [t("data.changedSince"), changed === undefined || changed === null ? t("unknown") : t(changed ? "yes" : "no")],
    // Each tier: the volume rule (minCurated) and something to train on.
    [t("data.tiers"), Object.entries(status.tiers ?? {})
      .map(([tier, state]) => `${t(`opt.${tier}`)}: ${t(state.ready ? "yes" : "no")}`
        // not ready: why, as the command line says it (in the page's words where it sends a code)
        + (state.ready ? "" : ` (${tMsg(state.code, state.params, state.reason ?? "")})`)).join(" · ") || "–"],
    [t("data.lastJob"), job ? [job.jobId, t(`state.${job.status}`), job.adapterName && `${job.adapterName} ${job.version ?? ""}`]
      .filter(Boolean).join(" · ") : t("data.never")],
    // Stale: examples it was trained on were deleted; its files gone: it cannot be served (the adapter table
    // marks both the same way, and `lunatrain status` says both).
    [t("data.activeAdapter"), active ? adapterFact(active)
      // a registry that cannot be read: "none" would not be the truth (the problem below says why)
      : t(status.activeAdaptersKnown === false ? "unknown" : "data.none")],
    // The others active, as `lunatrain status` names them: two on the served base is the state the eval gate
    // refuses to choose in, and one on another base is served once that base is configured.
    ...alsoActive(status.activeAdapters ?? [], active),
    // Parts that could not be read (a damaged registry or job database), each with its fix, as `status` says them.
    ...(status.problems ?? []).map((problem, i) => {
      const coded = status.problemCodes?.[i];
      return [t("data.problem"), coded ? tMsg(coded.code, coded.params, problem) : problem];
    }),
  ]);
}

/** An active adapter as the data panel names it: stale (examples it learned were deleted) and files gone marked as
 * the adapter table marks them, and its base where it is not the one served. */
function adapterFact(a) {
  return `${a.name} ${a.version}${a.stale ? ` · ${t("adapters.stale")}` : ""}`
    + (a.filesMissing ? ` · ${t("adapters.missing")}` : "")
    + (a.matchesBaseModel === false ? ` (${t("data.onBase", { base: a.baseLabel ?? a.baseModel })})` : "");
}

function alsoActive(all, active) {
  const same = (a) => active && a.name === active.name && a.version === active.version && a.baseModel === active.baseModel;
  const others = all.filter((a) => !same(a));
  return others.length ? [[t("data.alsoActive"), others.map(adapterFact).join("; ")]] : [];
}

const dataTurns = turns(); // the background refresh, a new threshold and an export each ask

async function loadDataStatus(background = false) {
  const current = dataTurns();
  // A background refresh keeps the panel readable (as the adapter panel's does): aria-busy would hold back
  // its live region, and what it shows is still true.
  if (!background) $("data").setAttribute("aria-busy", "true");
  try {
    const status = await api.dataStatus(minCurated());
    if (current()) {
      renderDataStatus(status);
      clearErrorsOf(t("data.heading")); // an earlier failure of this panel is no longer true
    }
  } catch (error) {
    if (!current()) return null;
    if (error.status === 401) return null; // request() has asked for the token (onUnauthorized)
    $("data-ready").dataset.ready = "unknown";
    $("data-ready").textContent = `${t("err.prefix")}: ${errorText(error)}`;
    showError(error, t("data.heading"), { background });
  } finally {
    if (current()) $("data").removeAttribute("aria-busy");
  }
  return null;
}

function renderPrepare(report) {
  $("prepare-report").hidden = false;
  const status = report.status ?? "unknown";
  $("prepare-status").textContent = t("data.prepareStatus", { status: t(`severity.${status}`) });
  $("prepare-status").dataset.status = status;
  // Problems first (fail, warn), then the passed checks, each group in the report's order.
  const rank = { fail: 0, error: 0, warn: 1 };
  const checks = [...(report.checks ?? [])].sort((a, b) => (rank[a.severity] ?? 2) - (rank[b.severity] ?? 2));
  const body = $("checks-table").tBodies[0];
  // A passed check reads "ok" and says what was found fine; "info" stays for figures (statistics, estimate).
  const shown = (check) => (check.severity === "info" && String(check.code ?? "").endsWith(".ok") ? "passed" : check.severity);
  const problem = (check) => check.severity === "warn" || check.severity === "fail";
  body.replaceChildren(...(checks.length ? checks.map((check) => h("tr", { dataset: { severity: check.severity } },
    h("td", {}, h("span", { class: `severity severity-${shown(check) === "passed" ? "ok" : check.severity}` },
      t(`severity.${shown(check)}`))),
    h("td", { class: "num" }, formatNumber(check.count ?? 0)),
    h("td", {}, problem(check) && check.id ? h("code", {}, check.id) : null, problem(check) && check.id ? " " : null,
      tMsg(check.code, check.params, check.message ?? ""),
      // The records to fix, as the CLI names them (the first five, "…" when there are more; the report lists them).
      problem(check) && check.examples?.length ? h("span", { class: "check-examples" },
        ` (${check.examples.slice(0, 5).join(", ")}${(check.count ?? 0) > Math.min(check.examples.length, 5) ? ", …" : ""})`) : null))) :
    [h("tr", {}, h("td", { colspan: 3 }, t("data.noChecks")))]));
  renderSample(report.samples?.[0], report.template?.terminator?.text);
}

// One train sample as the model sees it: trained pieces (answers and their terminator) marked, the rest
// (system, user, headers) shown as context.
function renderSample(sample, terminator) {
  $("prepare-sample").hidden = !sample;
  if (!sample) return;
  $("sample-legend").textContent = t("data.sampleLegend", {
    trained: formatNumber(sample.trainedTokens), total: formatNumber(sample.tokens), terminator: terminator ?? "–" });
  $("sample-text").replaceChildren(...sample.pieces.map((piece) => piece.trained ?
    h("mark", { class: "trained", title: t("data.trained") }, ...shown(piece.text))
    : h("span", { class: "context" }, ...shown(piece.text))));
}

// Bidi controls in a user's text (U+202E turns the rest of the line around) written as their escapes, as
// `lunatrain prepare --show` writes them: in the one view meant to check each answer's terminator, an
// override in the answer showed the template's own `<|im_end|>` as `<|dne_mi|>`.
const BIDI_CONTROL = /([\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069])/;

function shown(text) {
  return text.split(BIDI_CONTROL).map((part, i) => (i % 2
    ? h("span", { class: "unseen" }, `\\u${part.codePointAt(0).toString(16).padStart(4, "0")}`) : part));
}

async function runExport(event) {
  await busy(event.currentTarget, t("data.exporting"), async () => {
    try {
      const summary = await api.exportData();
      const count = summary?.counts?.merged?.total ?? summary?.total ?? summary?.counts?.total ?? "–";
      const done = t("data.exported", { count: typeof count === "number" ? formatNumber(count) : count });
      // A tier whose samples all fell into val/test: said now, not first when a run on it fails its preflight.
      const notes = (summary?.noteCodes ?? []).map((note) => tMsg(note.code, note.params));
      showNotice([done, ...notes].join(" "), notes.length ? "warning" : "notice");
      // An earlier export's failure, and a preflight refused for want of an export, are no longer true.
      clearErrorsOf(t("data.export"));
      clearErrorsOf(t("data.prepare"), "export.missing");
    } catch (error) {
      showError(error, t("data.export"));
    }
  });
  loadDataStatus();
}

/** Wait for the form's values (`refilled`) on behalf of `button`, which says it is busy meanwhile; false when it
 * is waiting already: a click more must not send the same request again once the values come. */
async function valuesFor(button) {
  if (button.getAttribute("aria-busy") === "true") return false;
  button.setAttribute("aria-busy", "true");
  try {
    await refilled;
  } finally {
    button.removeAttribute("aria-busy");
  }
  return true;
}

async function runPrepare(event) {
  const button = event.currentTarget; // gone from the event once it has been dispatched
  const min = checkedMinCurated();
  if (min === null) return;
  if (!(await valuesFor(button))) return;
  // The job the training form would start (its bad fields are marked there, and nothing is sent); the job's
  // own minCurated and gate belong to the flow, the threshold checked here is the data panel's.
  const form = loraForm.read();
  if (form === null) return;
  const { minCurated: _min, gate: _gate, ...run } = form;
  await busy(button, t("data.preparing"), async () => {
    try {
      const report = await api.prepare({ ...run, minCurated: min, profile: PROFILE });
      renderPrepare(report);
      clearErrorsOf(t("data.prepare"));
      showNotice(t("data.prepared", { status: t(`severity.${report.status}`) }));
    } catch (error) {
      // A failed check may come back as 409 with the report in `details`: show its table all the same.
      if (error.details?.checks) renderPrepare(error.details);
      showError(error, t("data.prepare"));
    }
  });
}

// ---- training ------------------------------------------------------------------------------------------

// The profile the training form is filled from, and that its job and its preflight resolve with.
const PROFILE = "luna";
const loraForm = new LoraForm($("lora-form"));
const tryPanel = new TryPanel();
const adapters = new AdapterView(() => {
  loadDataStatus();
  tryPanel.refresh();
});
/** Whether the header, as the last health answer set it, says the trainer is offline. */
const trainerOffline = () => $("provider-label").dataset.state === "offline";

const jobView = new JobView(() => {
  adapters.load();
  tryPanel.refresh();
  loadDataStatus();
  loadHealth();
}, trainerOffline);

async function submitJob(button, call) {
  await busy(button, null, async () => {
    try {
      const accepted = await call();
      loadHealth(); // a start may have started the trainer on demand: the header (and the job's polls) see it
      clearErrors("invalid_request");
      jobView.follow(accepted.job);
      // Started, or waiting behind a job that runs (perhaps one another tab started): say which.
      await jobView.loadActive();
      const ahead = jobView.ahead(accepted.job);
      // The example adapter seeds an empty store with the bundled dataset: the user's data changed, so say so.
      const seeded = accepted.seeded;
      const added = seeded && (seeded.examplesAdded || seeded.memoryAdded)
        ? " " + t("train.seeded", { examples: seeded.examplesAdded, memory: seeded.memoryAdded }) : "";
      if (accepted.joined) showNotice(t("train.joined", { jobId: accepted.jobId }));
      else showNotice((ahead ? t("train.queued", { jobId: accepted.jobId, ahead: ahead.id })
        : t("train.submitted", { jobId: accepted.jobId })) + added);
    } catch (error) {
      // Marked, not focused: the user has moved on (Tab), and the next keystrokes are meant for that field.
      if (error.status === 422) loraForm.showErrors(serverFieldErrors(error), { focus: false });
      showError(error);
    }
  });
}

let starting = false; // a Start waiting for a base's values: a second click must not queue a second job
$("lora-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (starting) return;
  starting = true;
  const start = $("start-button");
  start.setAttribute("aria-busy", "true"); // waiting for a base's values: said, not a dead button
  try {
    await refilled; // a base model typed just before: its values first
    start.removeAttribute("aria-busy");
    const params = loraForm.read();
    // The profile the form shows (loadDefaults): the fields the form lacks take its values, as the preflight
    // and `lunatrain lora` resolve them.
    if (params) await submitJob($("start-button"), () => api.start({ ...params, profile: PROFILE }));
  } finally {
    starting = false;
    start.removeAttribute("aria-busy");
  }
});

$("quick-start-button").addEventListener("click", async (event) => {
  const button = event.currentTarget; // gone from the event once it has been dispatched
  if (!(await valuesFor(button))) return;
  const body = loraForm.readSome(["adapterName", "datasetTier", "baseModel"]);
  if (body) submitJob(button, () => api.quickStart(body));
});

$("example-button").addEventListener("click", (event) => submitJob(event.currentTarget, () => api.exampleAdapter({})));

$("reset-button").addEventListener("click", () => loadDefaults());

// Another base model typed in: the profile's values for that base (its own table, as `lunatrain luna
// --baseModel` takes them), not the configured base's, for every field the user has not changed.
// Start and the preflight wait for it (`refilled`): clicking Start right after typing a base model sends the
// form as that base's values make it.
let refilled = Promise.resolve();
loraForm.control("baseModel").addEventListener("change", (event) => {
  const field = event.currentTarget;
  const base = field.value.trim();
  refilled = (async () => {
    await filled; // the profile's first values first: coming later, they would replace this base's
    try {
      const { params } = await api.defaults(PROFILE, base || null);
      if (field.value.trim() === base) loraForm.refill(params); // not one typed since
    } catch (error) {
      await released(); // the field was left by pressing a button below it: its click first, then the new line
      // Marked, not focused: the user has moved on (Tab), and the next keystrokes are meant for that field. So
      // the refusal is said in the polite live region as well: a screen reader in the next field hears it there.
      if (error.status === 422) {
        const errors = serverFieldErrors(error);
        loraForm.showErrors(errors, { focus: false });
        const said = Object.entries(errors).map(([name, text]) => `${t(`field.${name}`)}: ${text}`);
        if (said.length) showNotice(said.join(" "), "warning");
      } else showError(error, t("train.formLabel"));
    }
  })();
});

/** `keepTyped`: the page's first load, where a field may have been typed before the values came. */
async function loadDefaults(keepTyped = false) {
  try {
    const { params } = await api.defaults(PROFILE);
    loraForm.fill(params, { keepTyped });
    // The data panel's threshold starts at the profile's minCurated too, until the user sets their own.
    const input = $("data-min-curated");
    if (!input.dataset.touched && Number.isInteger(params.minCurated)) input.value = String(params.minCurated);
  } catch (error) {
    // Without the defaults endpoint the built-in Luna defaults stand; anything else is worth saying.
    loraForm.fill({}, { keepTyped });
    if (error.status !== 404 && error.status !== 405) showError(error, t("train.formLabel"));
  }
}

async function loadLatestJob() {
  $("training").setAttribute("aria-busy", "true");
  try {
    // A job that runs (or waits) comes first, even when a later one has ended already (a queued job
    // cancelled while an earlier one still runs); loadActive follows it.
    if ((await jobView.loadActive())?.length) return;
    const job = await api.latestJob();
    sayNoJob("job.none");
    // A job started on this page while the answer was on its way is the one to follow, not this earlier one.
    if (job?.id && !jobView.jobId) jobView.follow(job);
  } catch (error) {
    // 404: no job yet, which the panel already says. 503: the trainer is offline, which the header says; the
    // panel must not say "no job started" beside a data panel that names the last one.
    sayNoJob(error.status === 503 ? "job.offline" : "job.none");
    if (error.status !== 404 && error.status !== 503) showError(error, t("job.heading"));
  } finally {
    $("training").removeAttribute("aria-busy");
  }
}

/** With no job running or waiting: the newest job, when it is not the one shown and ended after it. A job
 * that started and ended elsewhere (another tab, the command line) between two background refreshes is never
 * among the unfinished ones, and the panel went on saying "no job" beside a data panel that named it; a job
 * that ended before the one shown (a queued one cancelled while it ran) must not replace the failure the
 * user is reading. */
/** What the job panel says while it shows no job: `job.none`, or `job.offline` while the trainer cannot say. */
function sayNoJob(key) {
  const none = $("job-none");
  if (none.dataset.i18n === key) return;
  none.dataset.i18n = key;
  none.textContent = t(key);
}

async function followNewest() {
  try {
    const job = await api.latestJob();
    sayNoJob("job.none");
    const shown = jobView.job;
    if (job?.id && job.id !== jobView.jobId && (!shown || (FINAL_STATES.has(shown.status) && endedAfter(job, shown)))) {
      jobView.follow(job);
    }
  } catch (error) {
    // 404: no job yet; 503: the trainer is offline, which the header says. The next refresh asks again.
    sayNoJob(error.status === 503 ? "job.offline" : "job.none");
  }
}

/** Whether `job` ended (or, unfinished, was created) after `other` ended; true when either time is unknown. */
function endedAfter(job, other) {
  const at = (j) => Date.parse(j.finishedAt ?? j.createdAt ?? "");
  const [a, b] = [at(job), at(other)];
  return Number.isNaN(a) || Number.isNaN(b) || a > b;
}

// ---- start-up ------------------------------------------------------------------------------------------

function refreshAll() {
  loadHealth();
  loadDataStatus();
  adapters.load();
  tryPanel.refresh();
  loadLatestJob();
}

translatePage();
$("lang-switch").href = t("lang.switchHref");
$("lang-switch").hreflang = lang === "de" ? "en" : "de";
$("lang-switch").lang = lang === "de" ? "en" : "de";
$("trainer-start").addEventListener("click", startTrainer);
$("provider-refresh").addEventListener("click", () => loadHealth());
$("data-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (checkedMinCurated() !== null) loadDataStatus();
});
$("export-button").addEventListener("click", runExport);
$("prepare-button").addEventListener("click", runPrepare);
$("data-min-curated").addEventListener("input", (event) => {
  event.currentTarget.dataset.touched = "yes";
  event.currentTarget.removeAttribute("aria-invalid");
  $("data-min-curated-error").hidden = true;
});
// The other language is another page load: what was typed in the form goes along (this tab only), as values
// where they read as one (so "2.048" typed on the German page is 2048 on the English one too), else as typed.
const TYPED_KEY = "lunatrain.typed";
$("lang-switch").addEventListener("click", () => {
  const threshold = $("data-min-curated");
  const minCurated = threshold.dataset.touched
    ? checkField(MIN_CURATED_FIELD, threshold.value)[0] ?? threshold.value : null;
  sessionStorage.setItem(TYPED_KEY, JSON.stringify({ values: loraForm.typed(), touched: loraForm.changed(), minCurated }));
});

function restoreTyped() {
  const saved = sessionStorage.getItem(TYPED_KEY);
  sessionStorage.removeItem(TYPED_KEY);
  let typed;
  try {
    typed = JSON.parse(saved ?? "null");
  } catch {
    typed = null;
  }
  if (!typed?.values) return;
  loraForm.putBack(typed.values, typed.touched);
  if (typed.minCurated !== null && typed.minCurated !== undefined) {
    const min = typed.minCurated;
    $("data-min-curated").value = typeof min === "number" ? formatPlain(min) : String(min);
    $("data-min-curated").dataset.touched = "yes";
  }
}

// Start, the quick start's fields and the preflight wait for the form's first values (`refilled` starts as
// them): on a slow or busy server a Start clicked before they came read empty fields, marked them, and sent
// nothing, and the values that came then wiped the marks; the page said nothing at all.
const filled = loadDefaults(true).finally(() => {
  restoreTyped();
  refreshAll();
});
refilled = filled;
tryPanel.start();
// Light background refresh; the job itself is polled faster while one runs. With no job running here, the
// refresh also looks for one started elsewhere (another tab, the command line), and the panel follows it.
setInterval(() => loadHealth(false, true), HEALTH_MS);
setInterval(() => {
  // What the command line or another tab changed, also while a job is followed (for hours on a real run): the
  // data panel names the active adapter, so the table and the model choice must not go on showing another.
  loadDataStatus(true);
  adapters.load(true);
  tryPanel.refresh(true);
  // The job lists are the trainer's: while it is offline and has refused them, they would only answer 503.
  if ((!jobView.job || FINAL_STATES.has(jobView.job.status)) && !jobView.waiting("lists")) {
    jobView.loadActive().then((active) => active?.length === 0 && followNewest());
  }
}, DATA_MS);
