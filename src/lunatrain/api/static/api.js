// The assistant API as the dashboard uses it (docs/api.md). Every call either returns parsed JSON or throws
// an ApiError carrying the server's one-sentence message, so no caller has to look at raw responses.

import { t } from "./i18n.js";

const BASE = "/assistant/training";
const TOKEN_KEY = "lunatrain.apiToken";

export class ApiError extends Error {
  constructor(status, code, message, details = null, params = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
    this.params = params; // the values the message names, for a translated text (messages.py codes)
  }
}

/** A bearer token is only needed when the API runs with ASSISTANT_API_TOKEN; kept for this tab only. */
export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

let unauthorized = () => {};

/** What the page does when the API refuses a call for a missing or wrong token (app.js asks for it). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/** A call sent with `sent` (its headers) was refused for a missing or wrong token: request() says so, and the
 * chat panel's own fetch. Only a refusal of the token still in effect asks for one: a call sent before the user
 * gave it (the page's first load) may be answered after, over the page that token loaded. */
export function tokenRefused(sent) {
  if ((sent?.Authorization ?? null) === (authHeaders().Authorization ?? null)) unauthorized();
}

/** Whether a header can carry `token`: the server's tokens are printable ASCII, and a browser refuses to send
 * a header with a character beyond Latin-1 at all (typographic quotes or a € pasted with it), failing the
 * request as if the server were unreachable. */
export function sendable(token) {
  return /^[\x20-\x7e]+$/.test(token);
}

/** Request headers with the bearer token when one was given (the chat panel streams with its own fetch). A
 * kept token no header can carry (from before the form checked it) is dropped: the server then asks again. */
export function authHeaders(extra = {}) {
  let token = sessionStorage.getItem(TOKEN_KEY);
  if (token && !sendable(token)) {
    setToken(null);
    token = null;
  }
  return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
}

async function request(method, path, { body, query } = {}) {
  const url = new URL(path.startsWith("/v1/") || path.startsWith("/assistant/chat/") ? path : BASE + path, location.origin);
  for (const [key, value] of Object.entries(query ?? {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, String(value));
  }
  const headers = authHeaders({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "network", t("err.network"));
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null; // a proxy's HTML error page: fall through to the status line below
  }
  if (!response.ok) {
    if (response.status === 401) tokenRefused(headers);
    const err = data?.error;
    // Without a message (a proxy's error page) the status says it; its reason phrase is English, so not that.
    const message = err?.message || (typeof data?.detail === "string" ? data.detail : "") ||
      t("err.http", { status: response.status });
    throw new ApiError(response.status, err?.code || `http_${response.status}`, message, err?.details ?? null,
      err?.params ?? null);
  }
  return data;
}

const get = (path, query) => request("GET", path, { query });
const post = (path, body) => request("POST", path, { body: body ?? {} });
const seg = encodeURIComponent;

export const api = {
  health: (ensureTrainer = false) => get("/lora/provider-health", ensureTrainer ? { ensureTrainer: "true" } : {}),
  dataStatus: (minCurated) => get("/status", { minCurated }),
  exportData: () => post("/export"),
  prepare: (body) => post("/prepare", body),
  defaults: (profile = "luna", baseModel = null) => get("/lora/defaults", baseModel ? { profile, baseModel } : { profile }),
  start: (params) => post("/lora/start", params),
  quickStart: (body) => post("/lora/quick-start", body),
  exampleAdapter: (body) => post("/lora/example-adapter", body),
  job: (jobId) => get("/lora/status", { jobId }),
  latestJob: () => get("/lora/status"),
  jobs: (status, limit = 20) => get("/lora/jobs", { status, limit }),
  events: (jobId, after) => get(`/lora/jobs/${seg(jobId)}/events`, { after, limit: 500 }),
  cancel: (jobId) => post(`/lora/jobs/${seg(jobId)}/cancel`),
  adapters: () => get("/adapters"),
  activate: (name, version) => post(`/adapters/${seg(name)}/activate`, { version }),
  // the version the page shows active and the one it said the rollback returns to: refused (409) when either
  // changed since, not rolled back one step further or to a version the page never showed
  rollback: (name, version, to) => post(`/adapters/${seg(name)}/rollback`, { version, to }),
  // The row's version on the configured base only: one forced onto another base stays active there.
  deactivate: (name, version) =>
    post(`/adapters/${seg(name)}/deactivate`, version ? { version, configuredBaseOnly: true } : {}),
  reportUrl: (name, version) => `${BASE}/adapters/${seg(name)}/versions/${seg(version)}/report`,
  curveUrl: (name, version) => `${BASE}/adapters/${seg(name)}/versions/${seg(version)}/loss-curve.png`,
  chatModels: () => get("/v1/models"),
  chatExamples: () => get("/assistant/chat/examples"),
};

export const FINAL_STATES = new Set(["succeeded", "failed", "cancelled"]);

/** Whether the page sends a token (the API runs with ASSISTANT_API_TOKEN and the user gave it). */
export function hasToken() {
  return Boolean(sessionStorage.getItem(TOKEN_KEY));
}

/**
 * Open `url` (a file of the API: a report, a loss curve) in a new tab with the token, which a plain link
 * cannot send: the tab opens now, while the click still counts as the user's (a tab opened after the
 * download would be a blocked pop-up), and shows the file once it arrived. Throws an ApiError as request() does.
 */
export async function openWithToken(url) {
  const sent = authHeaders();
  const tab = window.open("", "_blank");
  try {
    let response;
    try {
      response = await fetch(url, { headers: sent });
    } catch {
      throw new ApiError(0, "network", t("err.network"));
    }
    if (!response.ok) {
      if (response.status === 401) tokenRefused(sent);
      let err = null;
      try {
        err = (await response.json())?.error ?? null;
      } catch {
        err = null;
      }
      throw new ApiError(response.status, err?.code || `http_${response.status}`,
        err?.message || t("err.http", { status: response.status }), err?.details ?? null, err?.params ?? null);
    }
    const file = URL.createObjectURL(await response.blob());
    if (tab) tab.location.href = file;
    setTimeout(() => URL.revokeObjectURL(file), 60_000); // the tab has read it by then
  } catch (error) {
    tab?.close();
    throw error;
  }
}
