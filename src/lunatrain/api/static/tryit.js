// "Ausprobieren": one prompt, answered side by side by the base model and by a chosen adapter version, both
// streamed from the OpenAI-compatible endpoint (/v1/chat/completions); the eval gate's golden cases are
// one-click examples. Greedy decoding (temperature 0), so the two columns differ only by the adapter.

import { api, authHeaders, ApiError, tokenRefused } from "./api.js";
import { t, formatNumber, errorText } from "./i18n.js";
import { h, showError, clearErrorsOf, turns } from "./ui.js";

const DEFAULT_MAX_TOKENS = 128;
const $ = (id) => document.getElementById(id);

/** POST a streamed chat request; `onPiece(text)` per content delta. Resolves {finish, usage, model}. */
// How long a column waits for a busy server (429) to take it: one try a second, for up to ten minutes (an
// answer of the other column that runs long on a slow CPU).
const BUSY_WAIT_MS = 1000;
const BUSY_TRIES = 600;

export async function streamChat(body, onPiece) {
  let response;
  const headers = authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" });
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers,
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    });
  } catch {
    throw new ApiError(0, "network", t("err.network"));
  }
  if (!response.ok) {
    if (response.status === 401) tokenRefused(headers); // the page asks for the token, as for any other panel's call
    const err = await response.json().catch(() => null);
    throw new ApiError(response.status, err?.error?.code ?? `http_${response.status}`,
      err?.error?.message ?? t("err.http", { status: response.status }), null, err?.error?.params ?? null);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const result = { finish: null, usage: null, model: body.model };
  let buffer = "";
  /** Read the whole events in `buffer` (all of it once the stream ended); true once `[DONE]` came. */
  const events = (ended) => {
    // Server-sent events are separated by a blank line (CRLF too, from a proxy); each of ours carries one
    // `data:` line. A stream's last event may end without its blank line.
    buffer = buffer.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0 || (ended && buffer.trim())) {
      const event = end >= 0 ? buffer.slice(0, end) : buffer;
      buffer = end >= 0 ? buffer.slice(end + 2) : "";
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return true;
        const chunk = JSON.parse(data);
        // OpenAI's shape sends a server error with code null: its type names it, in the page's words
        if (chunk.error) throw new ApiError(500, chunk.error.code ?? chunk.error.type ?? "stream", chunk.error.message);
        result.model = chunk.model ?? result.model;
        if (chunk.usage) result.usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) onPiece(choice.delta.content);
        if (choice?.finish_reason) result.finish = choice.finish_reason;
      }
    }
    return false;
  };
  for (;;) {
    // A connection lost in the middle of the answer (the server stopped, a proxy gave up): the page's own
    // sentence, not the browser's English "network error"; and a stream that ends without its `[DONE]`
    // was cut short too, not an answer that is complete.
    let read;
    try {
      read = await reader.read();
    } catch {
      throw new ApiError(0, "network", t("err.streamCut"));
    }
    const { value, done } = read;
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    if (events(done)) return result;
    if (done) throw new ApiError(0, "network", t("err.streamCut"));
  }
}

export class TryPanel {
  constructor() {
    this.form = $("try-form");
    this.prompt = $("try-prompt");
    this.select = $("try-model");
    this.send = $("try-send");
    this.base = null;
    this.messages = null; // an example's full conversation (system prompt included), until the prompt is edited
    this.cap = null; // the server's cap on max_tokens, once the examples said it
    this.maxTokens = DEFAULT_MAX_TOKENS;
    this.loadFailed = null; // the code of the last failed model list, whose alert the next good one clears
    this.turns = turns(); // the model list is reloaded after each trained or activated adapter
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.ask();
    });
    this.prompt.addEventListener("input", () => {
      this.messages = null;
      this.maxTokens = this.typedMaxTokens();
    });
    // Enter sends, as in a chat; Shift+Enter is a line break (and Enter ending an IME composition is not a send).
    this.prompt.addEventListener("keydown", (event) => {
      if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
      event.preventDefault();
      this.form.requestSubmit();
    });
  }

  /**
   * Start loading once the panel is first on screen: listing the models makes the API resolve the base model
   * (building luna-tiny, importing torch), work no one should wait for who only came to train.
   */
  start() {
    const section = $("try");
    if (!("IntersectionObserver" in window)) return this.load();
    const observer = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) {
        observer.disconnect();
        this.load();
      }
    });
    observer.observe(section);
    return null;
  }

  /** Fill the model choice (again after an adapter was trained or activated, once the panel was shown).
   * `background`: the page's periodic refresh, which redraws the choice only when the models changed. */
  async refresh(background = false) {
    if (this.loadedOnce) await this.load(background);
  }

  async load(background = false) {
    this.loadedOnce = true;
    const current = this.turns();
    try {
      const { data = [] } = await api.chatModels();
      if (current() && !(background && JSON.stringify(data) === this.shown)) this.render(data);
      if (current()) { // its last failure is no longer true (a late answer of an older load never saw it)
        if (this.loadFailed != null) clearErrorsOf(t("try.heading"), this.loadFailed);
        this.loadFailed = null;
      }
    } catch (error) {
      if (!current()) return;
      this.loadFailed = error?.code ?? "";
      showError(error, t("try.heading"), { background, once: true });
      // No longer "loading": the list is empty until a later refresh answers (the message says why).
      if (!this.select.value) this.select.replaceChildren();
    }
    // Not from the background refresh: a list that failed to load would say so again every 15 s.
    if (!background && !$("try-example-list").children.length) this.loadExamples();
  }

  render(models) {
    this.shown = JSON.stringify(models);
    const base = models.find((m) => m.owned_by === "base");
    this.base = base?.id ?? null;
    $("try-base-label").textContent = t("try.base", { model: this.base ?? "–" });
    const adapters = models.filter((m) => m.owned_by !== "base");
    const previous = this.select.value;
    // Adapter names first (their active version, resolved per request), then every version by name.
    const active = adapters.filter((m) => !m.id.includes("@"));
    const versions = adapters.filter((m) => m.id.includes("@"));
    this.select.replaceChildren(
      ...active.map((m) => h("option", { value: m.id }, t("try.activeOption", { name: m.id }))),
      ...versions.map((m) => h("option", { value: m.id }, m.id)),
    );
    if ([...this.select.options].some((o) => o.value === previous)) this.select.value = previous;
    const none = adapters.length === 0;
    this.select.disabled = none;
    $("try-no-adapter").hidden = !none;
    // The hint says why the list is disabled; a hidden one would still be read as its description.
    if (none) this.select.setAttribute("aria-describedby", "try-no-adapter");
    else this.select.removeAttribute("aria-describedby");
    // A redraw while an answer is on its way (the background refresh) keeps Send off: a second click would
    // send a second request beside the first.
    this.send.disabled = this.base === null || this.send.getAttribute("aria-busy") === "true";
  }

  typedMaxTokens() {
    return this.cap ? Math.min(DEFAULT_MAX_TOKENS, this.cap) : DEFAULT_MAX_TOKENS;
  }

  async loadExamples() {
    try {
      const { examples = [], max_tokens: cap } = await api.chatExamples();
      // A typed prompt asks for no more than this server allows (ASSISTANT_INFER_MAX_TOKENS may be below 128).
      if (cap) this.cap = cap;
      if (!this.messages) this.maxTokens = this.typedMaxTokens();
      $("try-examples").hidden = examples.length === 0;
      $("try-example-list").replaceChildren(...examples.map((example) => h("li", {},
        h("button", {
          type: "button", class: "small example", dataset: { case: example.id },
          // its own language, when the case says it: a screen reader reads it with that voice
          lang: example.lang,
          dir: "auto", // an Arabic or Hebrew case in its own direction, whatever the page's
          onclick: () => this.useExample(example),
        }, example.prompt))));
    } catch (error) {
      $("try-examples").hidden = true;
      showError(error, t("try.examples"));
    }
  }

  useExample(example) {
    // While answers stream, a second pair would write into the same boxes: one question at a time, as Send.
    if (this.asking) return;
    this.prompt.value = example.prompt;
    this.messages = example.messages;
    this.maxTokens = Math.min(example.max_tokens ?? DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS * 4);
    this.ask();
  }

  async ask() {
    if (this.asking) return;
    const text = this.prompt.value.trim();
    if (!text) {
      this.prompt.setAttribute("aria-invalid", "true");
      $("try-prompt-error").hidden = false;
      this.prompt.focus();
      return;
    }
    this.prompt.removeAttribute("aria-invalid");
    $("try-prompt-error").hidden = true;
    // Without the model list (it failed, or has not come yet) there is no base model to ask: ask for the list
    // again rather than send a request without a model, which the server refuses in its own words.
    if (this.base === null) {
      await this.load();
      if (this.base === null) return;
    }
    const messages = this.messages ?? [{ role: "user", content: text }];
    const columns = [["base", this.base]];
    if (!this.select.disabled && this.select.value) columns.push(["adapter", this.select.value]);
    else this.clearColumn("adapter"); // no adapter any more: not the last one's heading and token count
    const hadFocus = document.activeElement === this.send;
    this.asking = true;
    this.send.disabled = true;
    this.send.setAttribute("aria-busy", "true");
    const examples = [...document.querySelectorAll("#try-example-list button")];
    examples.forEach((button) => button.setAttribute("aria-disabled", "true")); // said, and keeping the focus
    $("try-said").replaceChildren();
    try {
      await Promise.all(columns.map(([key, model]) => this.answer(key, model, messages)));
    } finally {
      this.asking = false;
      examples.forEach((button) => button.removeAttribute("aria-disabled"));
      this.send.disabled = false;
      this.send.removeAttribute("aria-busy");
      // Disabling Send sent the focus to the page's start: give it back to the keyboard user who pressed it.
      const lost = document.activeElement === null || document.activeElement === document.body;
      if (hadFocus && lost) this.send.focus();
    }
  }

  clearColumn(key) {
    const col = this.column(key);
    col.text.textContent = "";
    col.meta.textContent = "";
    delete col.box.dataset.state;
    if (col.label.dataset.i18n) col.label.textContent = t(col.label.dataset.i18n);
  }

  column(key) {
    return { box: $(`try-${key}-box`), text: $(`try-${key}`), meta: $(`try-${key}-meta`), label: $(`try-${key}-label`) };
  }

  async answer(key, model, messages) {
    const col = this.column(key);
    col.text.textContent = "";
    col.meta.textContent = t("try.answering");
    col.box.setAttribute("aria-busy", "true");
    col.box.dataset.state = "streaming";
    try {
      const body = { model, messages, temperature: 0, max_tokens: this.maxTokens };
      let result;
      // A server that answers one request at a time (ASSISTANT_INFER_MAX_CONCURRENT=1) turns the second
      // column away at once (429): it waits for the first, as a client is told to, instead of failing.
      for (let tries = 1; ; tries += 1) {
        try {
          result = await streamChat(body, (piece) => col.text.append(piece));
          break;
        } catch (error) {
          if (error.status !== 429 || tries >= BUSY_TRIES) throw error;
          col.meta.textContent = t("try.waiting");
          await new Promise((done) => setTimeout(done, BUSY_WAIT_MS));
        }
      }
      if (key === "adapter") col.label.textContent = t("try.adapter", { model: result.model });
      const tokens = result.usage ? formatNumber(result.usage.completion_tokens) : "–";
      col.meta.textContent = t(result.finish === "length" ? "try.cut" : "try.done", { tokens });
      // An answer of only spaces and line breaks shows as an empty box: say so, or it looks like nothing came.
      if (col.text.textContent && !col.text.textContent.trim()) col.meta.textContent += ` · ${t("try.blank")}`;
      col.box.dataset.state = "done";
    } catch (error) {
      // the model asked for, not the last one that answered: the error is this one's
      if (key === "adapter") col.label.textContent = t("try.adapter", { model });
      col.meta.textContent = `${t("err.prefix")}: ${errorText(error)}`;
      col.box.dataset.state = "error";
    } finally {
      col.box.removeAttribute("aria-busy");
      // Said once per column, naming it: the two state lines alike ("Fertig · 12 Tokens") did not say whose.
      const answered = col.text.textContent.trim();
      $("try-said").append(
        h("p", {}, `${col.label.textContent}: ${answered ? `${answered} — ` : ""}${col.meta.textContent}`),
      );
    }
  }
}
