// Small DOM helpers shared by the panels: an element builder, the message live region and the confirm
// dialog.

import { t, errorText } from "./i18n.js";

// A layout change while a pointer is pressed moves what it was pressed on: its release lands beside it and no click
// happens. Leaving the base-model field by pressing Start or Reset asks the server for that base's values, whose
// refusal adds a line above the buttons; a background refresh adds or clears a message at the top of the page.
// A person's press outlasts a local answer, so such changes wait for the release (`released`, `afterRelease`).
let pressed = false;
let onRelease = [];
let longPress = 0;
// A release the page never sees (a context menu or another window took the pointer) must not hold the changes
// for good: the menu, the window's blur and, at the latest, a long press's end count as one.
const LONGEST_PRESS_MS = 2000;
function release() {
  clearTimeout(longPress);
  pressed = false;
  const waiting = onRelease;
  onRelease = [];
  setTimeout(() => waiting.forEach((done) => done())); // after the click that the release dispatches
}
document.addEventListener("pointerdown", () => {
  pressed = true;
  clearTimeout(longPress);
  longPress = setTimeout(release, LONGEST_PRESS_MS);
}, true);
for (const type of ["pointerup", "pointercancel", "contextmenu"]) document.addEventListener(type, release, true);
window.addEventListener("blur", release);

/** Resolves at once, or once a pressed pointer is released and its click has been dispatched: await it before
 * a change that adds or removes lines, where it answers what leaving a field asked. */
export function released() {
  return pressed ? new Promise((done) => onRelease.push(done)) : Promise.resolve();
}

/** `change()` now, or once a pressed pointer is released (see `released`). */
function afterRelease(change) {
  if (pressed) onRelease.push(change);
  else change();
}

/** h("td", {class: "num"}, "3") — attributes starting with "on" become listeners; children may be strings. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

const MAX_ALERTS = 4;

/**
 * Show an API error (or any Error) as one readable sentence in the assertive live region. The same text is
 * not repeated while it is still shown, so a poller that keeps failing does not flood the page. `background`:
 * the error of a refresh nobody clicked; when the list is full those go first, so that the answer to what the
 * user did stays on the page.
 */
/** Remove a message; focus goes to the next message's ×, else the previous one's, else back to where the user
 * was when it appeared (the dismissed button would otherwise leave keyboard focus on the page's body). */
function dismiss(item, origin) {
  const neighbour = item.nextElementSibling ?? item.previousElementSibling;
  const hadFocus = item.contains(document.activeElement);
  item.remove();
  if (!hadFocus) return;
  const target = neighbour?.querySelector(".dismiss")
    ?? (origin?.isConnected && origin !== document.body && !origin.disabled ? origin : document.getElementById("main"));
  target?.focus();
}

export function showError(error, context = "", options = {}) {
  afterRelease(() => addError(error, context, options));
}

function addError(error, context, { background = false, once = false }) {
  // A missing or wrong API token is said once, by the token form and the trainer's label (app.js), not by
  // every panel whose call it refused.
  if (error?.status === 401) return;
  const alerts = document.getElementById("alerts");
  // The status in the prefix, unless the sentence is the one that says only the status (err.http).
  const status = error?.status && error.code !== `http_${error.status}` ? ` (${error.status})` : "";
  const said = errorText(error);
  const text = `${context ? `${context}: ` : `${t("err.prefix")}${status}: `}${said}`;
  for (const existing of alerts.querySelectorAll(".message")) {
    if (existing.querySelector(".message-text")?.textContent === text) return;
    // `once`: a panel's own loading (not a click, whose error the user looks for under its label) that met a
    // cause already said (an unreadable registry fails the adapter table and the model choice) adds no alert.
    if (once && error?.code && existing.dataset.code === error.code && existing.dataset.said === said) return;
  }
  // Where the user was (the control that failed), for focus to go back to when the message is dismissed: a
  // button busy with the failed work is disabled meanwhile, and focus then rests on the body.
  const active = document.activeElement;
  const origin = alerts.contains(active) ? null
    : active && active !== document.body ? active : document.querySelector('button[aria-busy="true"]');
  const item = h("div", { class: "message error",
    dataset: { code: error?.code ?? "", context, said, ...(background ? { background: "yes" } : {}) } },
    h("span", { class: "message-text" }, text),
    h("button", {
      type: "button", class: "dismiss", "aria-label": t("messages.dismiss"), title: t("messages.dismiss"),
      onclick: () => dismiss(item, origin),
    }, "×"));
  alerts.append(item);
  while (alerts.children.length > MAX_ALERTS) {
    (alerts.querySelector('[data-background="yes"]') ?? alerts.firstElementChild).remove();
  }
}

/** Clear error messages whose code matches (e.g. once the trainer is reachable again). */
export function clearErrors(code) {
  afterRelease(() => {
    for (const item of document.querySelectorAll("#alerts .message")) {
      if (!code || item.dataset.code === code) item.remove();
    }
  });
}

/** Clear the error messages a panel showed (its `context`) once the same action succeeds; with `code`, only
 * those of that code. */
export function clearErrorsOf(context, code) {
  afterRelease(() => {
    for (const item of document.querySelectorAll("#alerts .message")) {
      if (item.dataset.context === context && (!code || item.dataset.code === code)) item.remove();
    }
  });
}

/** A short confirmation ("Job … gestartet"); replaces the previous one. `kind` "warning": news that is not
 * good (a job that failed), not shown in the colour of success. */
export function showNotice(text, kind = "notice") {
  afterRelease(() => document.getElementById("notices").replaceChildren(h("div", { class: `message ${kind}` }, text)));
}

/** Ask in the modal dialog; resolves true when confirmed. Esc and "Abbrechen" resolve false. */
export function confirmDialog(text) {
  const dialog = document.getElementById("confirm-dialog");
  document.getElementById("confirm-text").textContent = text;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
    dialog.showModal();
    // Start on the harmless choice, so an accidental Enter does not confirm.
    dialog.querySelector('button[value="cancel"]').focus();
  });
}

/** Run `work` with `button` disabled (and `busyText` on it), restoring it afterwards. */
export async function busy(button, busyText, work) {
  const label = button.textContent;
  const hadFocus = document.activeElement === button;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  if (busyText) button.textContent = busyText;
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.textContent = label;
    // Disabling the button sent the focus to the page's start: give it back to a keyboard user, unless the
    // work moved it somewhere on purpose (a field marked invalid).
    const lost = document.activeElement === null || document.activeElement === document.body;
    if (hadFocus && lost && button.isConnected && !button.hidden) button.focus();
  }
}

/** For a panel loaded from several places whose requests can overlap (a background refresh, a user's action):
 * `const latest = turns()` once, then `const current = latest()` before each request and `current()` after it
 * says whether it is still the newest; only the newest answer is shown, or a slow earlier answer would
 * overwrite a later one's. */
export function turns() {
  let last = 0;
  return () => {
    const mine = ++last;
    return () => mine === last;
  };
}

/** A <dl> filled from [term, value] pairs (values may be nodes). */
export function fillFacts(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value ?? "–")]));
}
