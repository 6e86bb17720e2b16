// The adapter registry, one table per base model (guide §7: the same export trained on several bases):
// every version with its losses, gate result, aliases and stale mark; activate and rollback after a confirm.

import { api, hasToken, openWithToken } from "./api.js";
import { t, tMsg, formatDate, formatLoss } from "./i18n.js";
import { h, showError, showNotice, clearErrorsOf, confirmDialog, turns } from "./ui.js";

// Versions of an adapter shown before "show all": a year of daily runs is hundreds of rows. The active and
// latest versions are always shown, however old.
const SHOWN = 10;

function versionNumber(version) {
  const m = /^v(\d+)$/.exec(version ?? "");
  return m ? Number(m[1]) : -1;
}

// The gate's outcome as the registry records it: {status: "passed"|"failed"|"skipped"|"error", reason}.
function gateCell(gate, ref) {
  if (!gate) return h("td", {}, t("gate.none"));
  const state = gate.passed === true ? "passed" : gate.passed === false ? "failed" : gate.status ?? "skipped";
  const coded = Array.isArray(gate.reasonCodes) && gate.reasonCodes.length
    ? gate.reasonCodes.map((r, i) => tMsg(r.code, r.params, gate.reasons?.[i] ?? "")).join("; ") : null;
  const reason = coded ?? gate.reason ?? (Array.isArray(gate.reasons) ? gate.reasons.join("; ") : "");
  const notes = gateNotes(gate);
  // A pass that followed a refusal (judged again, e.g. once activated by hand) keeps why it was refused.
  const refusal = gate.passed === true && gate.earlierRefusal ? gate.earlierRefusal : null;
  if (refusal) {
    const why = Array.isArray(refusal.reasonCodes) && refusal.reasonCodes.length
      ? refusal.reasonCodes.map((r, i) => tMsg(r.code, r.params, refusal.reasons?.[i] ?? "")).join("; ")
      : (refusal.reasons ?? []).join("; ");
    notes.push(t("gate.refusedEarlier", { reasons: why }));
  }
  return h("td", {},
    h("span", { class: `gate gate-${state}` }, t(`gate.${state}`)),
    reason ? h("span", { class: "gate-reasons" }, reason) : null,
    state === "failed" ? failedCases(gate, ref) : null,
    notes.length ? h("ul", { class: "gate-notes" }, notes.map((note) => h("li", {}, note))) : null);
}

/** A refusal's failed golden cases, those the baseline passed first: what to look at to fix the data or the
 * case (the gate record keeps the first ten; `eval-gate --adapter` judges the version again and names all). */
function failedCases(gate, ref) {
  const cases = Array.isArray(gate.failedCases) ? gate.failedCases : [];
  if (!cases.length) return null;
  const items = cases.map((c) => h("li", {}, t(c.baselinePassed === true ? "gate.caseRegressed" : "gate.caseFailed",
    { id: c.id, source: c.source, checks: (c.checks ?? []).join(", ") })));
  const count = gate.failedCaseCount ?? cases.length;
  if (count > cases.length) items.push(h("li", {}, t("gate.moreCases", { count: count - cases.length, ref })));
  // Folded under a line that counts them: ten cases in a phone's narrow column made a row 1,500 px tall.
  return h("details", { class: "gate-cases-fold" }, h("summary", {}, t("gate.casesCount", { count })),
    h("ul", { class: "gate-cases", "aria-label": t("gate.casesLabel") }, items));
}

/** What the decision rests on besides the numbers (a golden case left out, the base model as the baseline),
 * in the page's language; a record written before notes had codes shows its English sentences. "Stays
 * inactive" only repeats the state and reasons the cell shows already. */
function gateNotes(gate) {
  if (!Array.isArray(gate.notes)) return [];
  return gate.notes.map((text, i) => {
    const c = Array.isArray(gate.noteCodes) ? gate.noteCodes[i] : null;
    if (c?.code === "gate.stays_inactive") return null;
    return c ? tMsg(c.code, c.params, text) : text;
  }).filter(Boolean);
}

/** A link to a file of a version (report, loss curve). A plain link cannot send the API's token: with one,
 * a click fetches the file with it and shows it in the new tab (api.openWithToken). */
function fileLink(href, label, text) {
  return h("a", { href, target: "_blank", rel: "noopener", "aria-label": label, onclick: (event) => {
    if (!hasToken()) return;
    event.preventDefault();
    openWithToken(href).catch((error) => showError(error, t("adapters.heading")));
  } }, text);
}

export class AdapterView {
  /** `afterChange()` runs after activate/rollback (the data panel shows the active adapter too). */
  constructor(afterChange) {
    this.afterChange = afterChange;
    this.groups = document.getElementById("adapter-groups");
    this.empty = document.getElementById("adapters-empty");
    this.unreadable = document.getElementById("adapters-unreadable");
    this.turns = turns(); // start-up, a finished job and activate/rollback each reload the table
    this.expanded = new Set(); // "base/adapter" whose every version is shown: kept across refreshes
    this.loadFailed = null; // the code of the last failed list load, whose alert the next good one clears
  }

  /** `background`: the page's periodic refresh (a change made elsewhere: the command line, another tab). It
   * redraws only what changed, so a refresh that brings nothing new keeps the focus where it was. */
  async load(background = false) {
    const section = document.getElementById("adapters");
    const current = this.turns();
    if (!background) section.setAttribute("aria-busy", "true");
    try {
      const { bases = [] } = await api.adapters();
      // Drawn again when it changed, or when the panel last said its list could not be read (a refresh that
      // brings the same list back must take that line away).
      const same = background && JSON.stringify(bases) === this.shown && this.unreadable.hidden;
      if (current() && !same) this.render(bases);
      // What the last failed load said is no longer true (and only that: a failed download keeps its alert).
      // (Only the newest answer: a late one of an older load never saw that failure.)
      if (current()) {
        if (this.loadFailed != null) clearErrorsOf(t("adapters.heading"), this.loadFailed);
        this.loadFailed = null;
      }
    } catch (error) {
      if (current()) {
        this.loadFailed = error?.code ?? "";
        if (!background) {
          // not "no adapters yet": the list could not be read, and the panel says so (not a heading alone)
          this.empty.hidden = true;
          this.unreadable.hidden = false;
        }
        showError(error, t("adapters.heading"), { background, once: true });
      }
    } finally {
      if (current()) section.removeAttribute("aria-busy");
    }
  }

  render(bases) {
    this.shown = JSON.stringify(bases);
    this.unreadable.hidden = true;
    const withVersions = bases.filter((b) => (b.adapters ?? []).some((a) => (a.versions ?? []).length));
    this.empty.hidden = withVersions.length > 0;
    this.groups.replaceChildren(...withVersions.map((base) => this.baseGroup(base)));
  }

  baseGroup(base) {
    const name = base.baseModel ?? t("unknown");
    // Activate and rollback act on the server's configured base: in another base's group they would change
    // the served one, or be refused. Deactivating a version acts wherever it is active, so it stays.
    const served = base.configured !== false;
    const rows = [];
    for (const adapter of [...base.adapters].sort((a, b) => a.name.localeCompare(b.name))) {
      // Newest first; the revisions of an overwrite slot are all "current": by revision.
      const versions = [...(adapter.versions ?? [])].sort((a, b) =>
        versionNumber(b.version) - versionNumber(a.version) || (b.revision ?? 0) - (a.revision ?? 0));
      const key = `${name}/${adapter.name}`;
      const folded = versions.length > SHOWN && !this.expanded.has(key);
      const aliases = adapter.aliases ?? {};
      // The active and the latest row, each once: every revision of a slot carries the alias's name.
      const active = versions.find((x) => x.state?.active ?? aliases.active === x.version);
      const latest = versions.find((x) => aliases.latest === x.version);
      const kept = (x, i) => !folded || i < SHOWN || x === active || x === latest;
      for (const version of versions.filter(kept)) rows.push(this.row(adapter, version, served));
      if (versions.length > SHOWN) rows.push(this.foldRow(adapter.name, key, versions.length, folded));
    }
    const captionId = `caption-${name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    return h("div", { class: "adapter-group", dataset: { base: name } },
      h("h3", {}, t("adapters.base", { base: name })),
      !served && h("p", { class: "badge-note other-base" },
        t(base.anotherBuild ? "adapters.anotherBuild" : "adapters.otherBase", { base: name })),
      h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-labelledby": captionId },
        h("table", { class: "adapters-table" },
          h("caption", { id: captionId, class: "visually-hidden" }, t("adapters.caption", { base: name })),
          h("thead", {}, h("tr", {}, ["name", "version", "created", "valLoss", "gate", "badges", "actions"]
            .map((key) => h("th", { scope: "col" }, t(`adapters.${key}`))))),
          h("tbody", {}, rows))));
  }

  /** The row under a long adapter's versions: show them all, or only the newest again. */
  foldRow(name, key, count, folded) {
    const toggle = () => {
      if (folded) this.expanded.add(key);
      else this.expanded.delete(key);
      this.render(JSON.parse(this.shown));
      // The table was rebuilt: the keyboard stays on the same adapter's button.
      this.groups.querySelector(`button[data-fold="${CSS.escape(key)}"]`)?.focus();
    };
    return h("tr", { class: "fold-row" }, h("td", { colspan: "7" },
      h("button", { type: "button", class: "small", dataset: { fold: key }, "aria-expanded": String(!folded),
        onclick: toggle }, t(folded ? "adapters.showAll" : "adapters.showFewer", { name, count, shown: SHOWN }))));
  }

  row(adapter, version, served = true) {
    const { name } = adapter;
    const v = version.version;
    const aliases = adapter.aliases ?? {};
    // The server's state, not the name: every revision of an overwrite slot is called "current".
    const isActive = version.state?.active ?? aliases.active === v;
    const metrics = version.metrics ?? {};
    const badges = [
      isActive && h("span", { class: "badge badge-active" }, t("adapters.active")),
      aliases.latest === v && h("span", { class: "badge badge-latest" }, t("adapters.latest")),
      // The registry's reason is an English sentence without a code: said in the page's words, as text beside
      // the badge (a tooltip reaches neither keyboard, touch nor screen reader).
      version.stale && h("span", { class: "badge badge-stale" }, t("adapters.stale")),
      version.stale && h("span", { class: "badge-note" }, t("adapters.staleTitle")),
      // Deleted by hand (or a disk restored in part): an active one stays active but is not served.
      version.filesMissing && h("span", { class: "badge badge-missing" }, t("adapters.missing")),
      version.filesMissing && h("span", { class: "badge-note" }, t("adapters.missingTitle")),
      // Not active: always say why (another base, refused by the gate, another version …).
      !isActive && version.state && h("span", { class: "inactive-reason" },
        tMsg(version.state.code, version.state.params, version.state.reason)),
    ];
    const vars = { name, version: v };
    const actions = [
      isActive && h("button", { type: "button", class: "small", "aria-label": t("adapters.deactivateLabel", vars),
        onclick: (event) => this.deactivate(name, v, event.currentTarget) }, t("adapters.deactivate")),
      // Rollback only where there is an earlier version to go back to (the server says which).
      served && isActive && adapter.rollbackTo && h("button", { type: "button", class: "small",
        "aria-label": t("adapters.rollbackLabel", vars),
        onclick: (event) => this.rollback(name, v, adapter.rollbackTo, event.currentTarget,
          Boolean((adapter.versions ?? []).find((x) => x.version === adapter.rollbackTo)?.stale)) },
      t("adapters.rollback")),
      // The server refuses to activate a version without its files (404): no button that can only fail.
      served && !isActive && !version.filesMissing && h("button", { type: "button", class: "small",
        "aria-label": t("adapters.activateLabel", vars),
        onclick: (event) => this.activate(name, v, event.currentTarget, version.gate?.passed === false,
          (adapter.versions ?? []).some((x) => x.state?.active ?? aliases.active === x.version), Boolean(version.stale)) },
      t("adapters.activate")),
      fileLink(api.reportUrl(name, v), t("adapters.reportLabel", vars), t("adapters.report")),
      fileLink(api.curveUrl(name, v), t("adapters.curveLabel", vars), t("adapters.curve")),
    ];
    const base = metrics.baseValLoss;
    return h("tr", { dataset: { adapter: name, version: v }, class: isActive ? "is-active" : null },
      h("th", { scope: "row" }, name),
      h("td", {}, v),
      h("td", {}, formatDate(version.created ?? version.createdAt)),
      h("td", { class: "num" }, `${formatLoss(metrics.valLoss)} (${formatLoss(base)})`),
      gateCell(version.gate, `${name}@${v}`),
      h("td", {}, h("div", { class: "cell-flex" }, badges)),
      h("td", {}, h("div", { class: "cell-flex" }, actions)));
  }

  /** Confirm `question`, run `call` with `button` disabled, show the notice `notice(result)`, reload. */
  async change(question, button, call, notice) {
    if (!(await confirmDialog(question))) return;
    button.disabled = true;
    try {
      const result = await call();
      showNotice(notice(result));
      await this.reloadAfterChange();
    } catch (error) {
      showError(error);
      button.disabled = false;
      // Disabling it took the focus away (to the page's start): give it back, so the keyboard can retry.
      if (button.isConnected) button.focus();
      // Refused because the table is out of date (another tab or a job changed it): show what is true now.
      if (error.status === 409 || error.status === 422 || error.status === 404) await this.reloadAfterChange();
    }
  }

  /** `refused`: the eval gate refused this version; `stale`: it was trained on examples deleted since. The
   * question says both before it replaces the active one, as the command line notes them. */
  activate(name, version, button, refused = false, replaces = true, stale = false) {
    // "It replaces the active version" only where one is active (not after a deactivate, nor the first time).
    const question = [t(refused ? "adapters.confirmActivateRefused" : "adapters.confirmActivate", { name, version }),
      stale && t("adapters.staleTarget", { name, version }),
      replaces && t("adapters.replacesActive")].filter(Boolean).join(" ");
    return this.change(question, button, () => api.activate(name, version),
      () => t("adapters.activated", { name, version }));
  }

  deactivate(name, version, button) {
    return this.change(t("adapters.confirmDeactivate", { name, version }), button, () => api.deactivate(name, version),
      () => t("adapters.deactivated", { name, version }));
  }

  /** `version` and `target`: the one this row shows active and the one the dialog says it returns to, sent
   * along: a page out of date is refused, not taken to a version it did not show. */
  rollback(name, version, target, button, stale = false) {
    const question = [t("adapters.confirmRollback", { name, version, target }),
      stale && t("adapters.staleTarget", { name, version: target })].filter(Boolean).join(" ");
    // The answer is the adapter (with its aliases) or the version now active; both name that version.
    return this.change(question, button,
      () => api.rollback(name, version, target),
      (result) => t("adapters.rolledBack", { name, version: result?.aliases?.active ?? result?.version ?? "–" }));
  }

  async reloadAfterChange() {
    await this.load();
    // The table was rebuilt, so the pressed button is gone: keep keyboard users in the panel.
    document.getElementById("adapters-heading").setAttribute("tabindex", "-1");
    document.getElementById("adapters-heading").focus();
    this.afterChange();
  }
}
