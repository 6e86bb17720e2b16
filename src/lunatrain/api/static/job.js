// The running job: progress polled from GET /lora/status?jobId=…, loss points read incrementally from the
// job's events (so the chart survives a page reload and misses no step between two polls), cancel.

import { api, FINAL_STATES } from "./api.js";
import { drawLossChart } from "./chart.js";
import { t, tMsg, errorText, formatNumber, formatFloat, formatLoss, formatDuration } from "./i18n.js";
import { h, fillFacts, showError, showNotice, clearErrors, clearErrorsOf } from "./ui.js";

const POLL_MS = 1000;
// A trainer that does not answer is asked less often, up to this (the header says it is down meanwhile).
const POLL_MAX_MS = 15000;
// The jobs besides the followed one (another tab's, one queued behind it) are looked for this often.
const OTHERS_MS = 5000;
// Unfinished states, the order the list shows them in: what runs, then what waits (the next to run first).
const ACTIVE_STATES = ["running", "cancelling", "validating", "queued"];
const OTHERS_SHOWN = 20; // jobs listed beside the one followed; a longer queue says how many more wait

/**
 * Add the loss points of one event to `series`: a training step (`progress`) carries `step` and `loss`; an
 * evaluation (`eval`, at the end of an epoch) carries `valLoss` and `baseValLoss` but no step, so it is
 * placed at the last step seen.
 */
function addPoints(series, event) {
  const step = Number(event.step);
  if (Number.isFinite(step)) series.lastStep = step;
  if (event.type === "progress" && Number.isFinite(step) && Number.isFinite(event.loss)) {
    series.train.push([step, event.loss]);
  }
  if (event.type === "log" && event.message) series.lastLog = tMsg(event.code, event.params, event.message);
  if (event.type === "eval") {
    if (Number.isFinite(event.valLoss)) series.val.push([series.lastStep, event.valLoss]);
    if (Number.isFinite(event.baseValLoss)) series.base = event.baseValLoss;
  }
}

/** The notice for a job that ended, and its kind. A job that trained but whose version the gate did not let
 * in did not do what was asked: said here, as the command line says FAILED, not only in the facts below; so is
 * one that passed and was not activated (cancelled while the gate ran, a refused activation). */
function finishedNotice(job) {
  const vars = { jobId: job.id, state: t(`state.${job.status}`) };
  const gate = job.gate?.status ?? (job.gate?.passed === false ? "failed" : null);
  if (job.status !== "succeeded" || !job.gate) return [t("job.finished", vars), job.status === "succeeded" ? "notice" : "warning"];
  if (gate !== "passed") return [t("job.finishedNotActivated", { ...vars, gate: t(`gate.${gate}`) }), "warning"];
  const codes = Array.isArray(job.gate.noteCodes) ? job.gate.noteCodes : [];
  if (job.gate.promoted !== false || codes.some((c) => c?.code === "gate.already_active")) {
    return [t("job.finished", vars), "notice"];
  }
  const why = codes.find((c) => ["gate.cancelled", "gate.not_activated", "gate.revision_gone"].includes(c?.code));
  return [t("job.finishedPassedNotActivated", { ...vars, why: why ? tMsg(why.code, why.params) : t("job.notActivated") }),
    "warning"];
}

export class JobView {
  /** `onFinished(job)` runs once when a followed job reaches a final state. */
  /** `offline`: whether the header says the trainer is offline; once a request of the trainer's has also been
   * refused (503), the polls wait until the header says it is back. */
  constructor(onFinished, offline = () => false) {
    this.onFinished = onFinished;
    this.offline = offline;
    this.refused = { poll: false, lists: false }; // the last such request of the trainer's was a 503
    this.job = null;
    this.timer = null;
    this.els = Object.fromEntries(
      ["job-none", "job-body", "job-id", "job-state", "job-percent", "job-progress", "job-facts", "job-error",
        "cancel-button", "loss-chart", "loss-legend", "job-others"].map((id) => [id, document.getElementById(id)]));
    this.active = []; // every unfinished job, as loadActive() last found them
    this.failures = 0; // polls in a row that failed: the next waits longer
    this.othersAt = 0; // when the other jobs were last looked for
    this.els["cancel-button"].addEventListener("click", () => this.cancel());
    this.series = { train: [], val: [], base: null, lastStep: 0, lastLog: null };
    // The chart is drawn at the figure's pixel width; redraw when that width changes (rotation, resize).
    let width = 0;
    new ResizeObserver(([entry]) => {
      if (Math.round(entry.contentRect.width) !== width) {
        width = Math.round(entry.contentRect.width);
        this.draw();
      }
    }).observe(this.els["loss-chart"].parentElement);
  }

  draw() {
    drawLossChart(this.els["loss-chart"], this.els["loss-legend"], this.series);
  }

  /** Whether to ask the trainer nothing of `kind` ("poll": the followed job, "lists": the unfinished jobs)
   * now: every request would be a 503 (an error in the browser's console each time) for what the header
   * already says; asked again once the header says the trainer is back. */
  waiting(kind) {
    if (!this.offline()) this.refused[kind] = false;
    return this.refused[kind];
  }

  /** Note how a request of `kind` went: after a 503 those requests wait while the header says offline (also
   * one refused before the header's first answer, as a page opened beside a stopped trainer meets it). */
  answered(kind, error = null) {
    this.refused[kind] = error?.status === 503;
  }

  /** Follow `job` (a Job record): show it now, then poll until it ends. */
  follow(job) {
    clearTimeout(this.timer);
    this.jobId = job.id;
    this.cursor = 0;
    this.series = { train: [], val: [], base: null, lastStep: 0, lastLog: null };
    this.failures = 0;
    this.render(job);
    this.renderOthers();
    this.readEvents().catch((error) => showError(error, t("job.heading"))).finally(() => {
      this.render(this.job);
      this.draw();
      if (!FINAL_STATES.has(job.status)) this.schedule();
    });
  }

  schedule() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.poll(), Math.min(POLL_MAX_MS, POLL_MS * 2 ** this.failures));
  }

  /**
   * Look for every unfinished job: the others are listed with a button each to follow it (a job started in
   * another tab, the running one a new job waits behind), and once the followed job has ended the panel
   * moves on to the one running now. Returns them, or null when the trainer could not say.
   */
  async loadActive() {
    this.othersAt = Date.now();
    let active;
    try {
      // Newest first, so a queue longer than a page would lose the jobs that run next: all queued ones are read
      // (the API's largest page), and the list below shows the first of them.
      const lists = await Promise.all(ACTIVE_STATES.map((status) => api.jobs(status, status === "queued" ? 500 : 20)));
      // Each list is newest first; a queue runs oldest first, so that is the order the waiting ones show in.
      const all = lists.flatMap((list, i) => (ACTIVE_STATES[i] === "queued" ? [...list.data].reverse() : list.data));
      // A job that moved from one list to the next between the requests is listed once, in its later state.
      active = all.filter((job, i) => all.findIndex((other) => other.id === job.id) === i);
      this.answered("lists");
    } catch (error) {
      this.answered("lists", error);
      return null; // the job's own poll and the header say what is wrong
    }
    this.active = active;
    const ended = !this.job || FINAL_STATES.has(this.job.status);
    if (ended && active.length && !active.some((job) => job.id === this.jobId)) this.follow(active[0]);
    else this.renderOthers();
    return active;
  }

  /** The job `job` waits behind (as loadActive last found them): for one that waits, the running job, else the
   * last queued before it; null for a job that does not wait. */
  ahead(job) {
    const index = this.active.findIndex((other) => other.id === job.id);
    const mine = this.active[index] ?? job;
    if (!["queued", "validating"].includes(mine?.status)) return null;
    const before = index >= 0 ? this.active.slice(0, index) : this.active.filter((other) => other.id !== job.id);
    return before.find((other) => other.status !== "queued") ?? before.at(-1) ?? null;
  }

  renderOthers() {
    const waiting = this.active.filter((job) => job.id !== this.jobId);
    const others = waiting.slice(0, OTHERS_SHOWN); // in queue order: the ones that run next
    const more = waiting.length - others.length;
    const box = this.els["job-others"];
    box.hidden = !others.length;
    const tail = more > 0 ? [h("span", {}, t("job.othersMore", { count: more }))] : [];
    box.replaceChildren(...(others.length ? [h("span", {}, t("job.others")), ...others.map((job) => {
      const vars = { jobId: job.id, name: job.params?.adapterName ?? "–", state: t(`state.${job.status}`) };
      // Named by the words it shows, so voice control reaches it by them; what it does is its description.
      return h("button", { type: "button", class: "small", title: t("job.otherLabel", vars),
        onclick: () => this.follow(job) }, t("job.other", vars));
    }), ...tail] : []));
  }

  async poll() {
    const jobId = this.jobId;
    if (this.waiting("poll")) {
      this.schedule();
      return;
    }
    try {
      const job = await api.job(jobId);
      this.answered("poll");
      if (jobId !== this.jobId) return; // another job was started meanwhile
      await this.readEvents();
      clearErrors("network");
      clearErrors("service_unavailable");
      clearErrorsOf(t("job.heading")); // an earlier failed poll of this panel is no longer true
      this.failures = 0;
      this.render(job);
      this.draw();
      if (FINAL_STATES.has(job.status)) {
        // A job that trained but whose version the gate did not let in did not do what was asked: say so here,
        // as the command line says FAILED, not only in the job's facts below.
        showNotice(...finishedNotice(job));
        this.onFinished(job);
        this.loadActive(); // the next job in the queue, if any, is the current one now
        return;
      }
      if (Date.now() - this.othersAt >= OTHERS_MS) this.loadActive();
    } catch (error) {
      this.failures += 1;
      this.answered("poll", error);
      showError(error, t("job.heading"), { background: true });
    }
    if (jobId === this.jobId) this.schedule();
  }

  async readEvents() {
    // Several pages at most per poll; a long job's history arrives over a few polls rather than at once.
    const { jobId, series } = this;
    for (let page = 0; page < 5; page += 1) {
      const { data, lastSeq, hasMore } = await api.events(jobId, this.cursor);
      // Another job was followed meanwhile (a click, the queue moving on): these points are not its.
      if (this.jobId !== jobId || this.series !== series) return;
      for (const event of data) addPoints(this.series, event);
      this.cursor = lastSeq;
      if (!hasMore) return;
    }
  }

  render(job) {
    this.job = job;
    const e = this.els;
    e["job-none"].hidden = true;
    e["job-body"].hidden = false;
    e["job-id"].textContent = `${t("job.id")} ${job.id}`;
    e["job-state"].textContent = t(`state.${job.status}`);
    e["job-state"].dataset.state = job.status;
    const p = job.progress ?? {};
    this.series.total = p.totalSteps ?? null;
    // Cut, not rounded: 99.6 % of the steps is not "100 %" while the last one still runs.
    const percent = job.status === "succeeded" ? 100 : Math.max(0, Math.min(100, Math.floor(Number(p.percent) || 0)));
    e["job-progress"].value = percent;
    // "30 %" in German, "30%" in English: each language's own way of writing it.
    e["job-percent"].textContent = t("job.percent", { percent: formatNumber(percent, 0) });
    const m = job.metrics ?? {};
    const facts = [
      [t("job.status"), t(`state.${job.status}`)],
      [t("job.step"), p.totalSteps ? `${formatNumber(p.step ?? 0)} / ${formatNumber(p.totalSteps)}` : formatNumber(p.step)],
      [t("job.epoch"), formatFloat(p.epoch, 3)],
      [t("job.tokensPerSecond"), formatNumber(p.tokensPerSec ?? m.tokensPerSec, 0)],
      [t("job.eta"), FINAL_STATES.has(job.status) ? "–" : formatDuration(p.etaSeconds)],
      [t("job.stepLoss"), formatLoss(p.loss)],
      [t("job.valLoss"), formatLoss(m.valLoss)],
    ];
    if (m.device) facts.push([t("provider.device"), String(m.device)]);
    if (job.adapter) facts.push([t("job.adapter"), `${job.adapter.name} ${job.adapter.version}`]);
    if (job.gate) facts.push([t("job.gate"), t(`gate.${job.gate.status ?? (job.gate.passed ? "passed" : "failed")}`)]);
    // The trainer's last log line says what a job does between steps (evaluating, gating, saving).
    if (this.series.lastLog) facts.push([t("job.lastLog"), this.series.lastLog]);
    fillFacts(e["job-facts"], facts);
    e["job-error"].hidden = !job.error;
    e["job-error"].textContent = job.error ? `${t("job.error")}: ${errorText(job.error)}` : "";
    e["cancel-button"].disabled = FINAL_STATES.has(job.status) || job.status === "cancelling";
  }

  async cancel() {
    if (!this.jobId) return;
    const button = this.els["cancel-button"];
    button.disabled = true;
    try {
      const job = await api.cancel(this.jobId);
      showNotice(t("job.cancelRequested", { jobId: this.jobId }));
      this.render(job);
      this.schedule();
      // The button stays disabled while the job is cancelled, and a disabled button loses the focus to the
      // page's start: keep keyboard users in the job's panel.
      if (button.disabled) {
        const heading = document.getElementById("job-heading");
        heading.setAttribute("tabindex", "-1");
        heading.focus();
      }
    } catch (error) {
      showError(error);
      button.disabled = false;
      button.focus();
    }
  }
}
