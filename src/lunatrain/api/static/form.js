// The LoRA parameter form: built from params.js, filled with the profile defaults, validated before any
// request, and annotated with the server's 422 field messages when the server disagrees.

import { t, formatPlain } from "./i18n.js";
import { FIELDS, GROUPS, FALLBACK_DEFAULTS, rangeText, collect, checkField } from "./params.js";
import { h } from "./ui.js";

const inputId = (name) => `f-${name}`;

function fieldNode(field) {
  const id = inputId(field.name);
  const hintParts = [];
  if (["int", "float"].includes(field.kind)) hintParts.push(rangeText(field));
  if (field.hint) hintParts.push(t(field.hint));
  else if (field.optional) hintParts.push(t("train.optional"));
  const hint = hintParts.length ? h("span", { class: "hint", id: `${id}-hint` }, hintParts.join(" · ")) : null;
  const error = h("span", { class: "field-error", id: `${id}-error`, hidden: true });
  const describedBy = [hint && `${id}-hint`, `${id}-error`].filter(Boolean).join(" ");
  const label = h("label", { for: id }, t(`field.${field.name}`), " ", h("code", {}, field.name));

  let control;
  if (field.kind === "select") {
    control = h("select", { id, name: field.name, "aria-describedby": describedBy },
      field.options.map((opt) => h("option", { value: opt }, t(`opt.${opt}`))));
  } else if (field.kind === "checkbox") {
    control = h("input", { id, name: field.name, type: "checkbox", "aria-describedby": describedBy });
    return h("div", { class: "field checkbox", dataset: { field: field.name } }, control, label, error);
  } else {
    // Text inputs with an input mode rather than type=number: a value the browser cannot parse would read
    // as empty there, and the message would say "required" instead of what is wrong.
    const mode = field.kind === "int" ? "numeric" : field.kind === "float" ? "decimal" : "text";
    control = h("input", {
      id, name: field.name, type: "text", inputmode: mode, autocomplete: "off", spellcheck: "false",
      "aria-describedby": describedBy, maxlength: field.maxLength,
    });
  }
  return h("div", { class: "field", dataset: { field: field.name } }, label, control, hint, error);
}

export class LoraForm {
  constructor(form) {
    this.form = form;
    this.defaults = { ...FALLBACK_DEFAULTS };
    const container = form.querySelector("#lora-fields");
    for (const group of GROUPS) {
      const fields = FIELDS.filter((f) => f.group === group).map(fieldNode);
      const folded = group === "advanced";
      // Inside <details> the summary already shows the group's name; the legend stays for screen readers.
      const legend = h("legend", { class: folded ? "visually-hidden" : null }, t(`train.group.${group}`));
      const fieldset = h("fieldset", { class: `group group-${group}` }, legend, fields);
      // The rarely changed knobs fold away; they open by themselves when one of them is invalid.
      container.append(folded
        ? h("details", { class: "advanced" }, h("summary", {}, t(`train.group.${group}`)), fieldset)
        : fieldset);
    }
    this.summary = form.querySelector("#form-summary");
    this.touched = new Set(); // fields the user changed since the form was filled: a refill keeps them
    form.addEventListener("input", (event) => {
      const name = event.target?.name;
      if (name) this.setError(name, null);
      if (name) this.touched.add(name);
    });
  }

  control(name) {
    return this.form.elements.namedItem(name);
  }

  /** Fill every field from `values` (server defaults when available). */
  /** The profile's values into every field; `keepTyped`: not into those the user changed since the page
   * loaded (the first defaults of a slow server came after a field was typed, and replaced it). */
  fill(values, { keepTyped = false } = {}) {
    const typed = keepTyped ? new Set(this.touched) : new Set();
    this.touched = typed;
    this.defaults = { ...FALLBACK_DEFAULTS, ...values };
    // The server resolves alpha to 2 × rank; an empty field keeps following a rank the user changes.
    if (this.defaults.alpha === 2 * this.defaults.rank) this.defaults.alpha = null;
    for (const field of FIELDS) {
      if (typed.has(field.name)) continue;
      const control = this.control(field.name);
      const value = this.defaults[field.name];
      if (field.kind === "checkbox") control.checked = Boolean(value);
      // In the page's notation ("0,01" in German), as the values put back after a language switch are.
      else if (value === null || value === undefined) control.value = "";
      else control.value = typeof value === "number" ? formatPlain(value) : String(value);
      this.setError(field.name, null);
    }
    this.summary.hidden = true;
  }

  /** The profile's values for another base model (`values`): each field the user has not changed since the
   * form was filled takes the new one; what the user typed (valid or not), and the base model, stay. */
  refill(values) {
    const next = { ...FALLBACK_DEFAULTS, ...values };
    if (next.alpha === 2 * next.rank) next.alpha = null;
    for (const field of FIELDS) {
      if (field.name === "baseModel" || this.touched.has(field.name)) continue;
      const control = this.control(field.name);
      const now = next[field.name];
      if (field.kind === "checkbox") control.checked = Boolean(now);
      else if (now === null || now === undefined) control.value = "";
      else control.value = typeof now === "number" ? formatPlain(now) : String(now);
      this.setError(field.name, null);
    }
    this.defaults = next;
  }

  setError(name, message) {
    const control = this.control(name);
    if (!control) return;
    const error = this.form.querySelector(`#${inputId(name)}-error`);
    error.textContent = message ?? "";
    error.hidden = !message;
    if (message) control.setAttribute("aria-invalid", "true");
    else control.removeAttribute("aria-invalid");
  }

  /** Show `errors` (name → message) next to their fields and focus the first (`focus` false: where the user
   * is stays focused, as for a field checked once it was left); returns how many. */
  showErrors(errors, { focus = true } = {}) {
    const names = FIELDS.map((f) => f.name).filter((n) => n in errors);
    for (const field of FIELDS) this.setError(field.name, errors[field.name] ?? null);
    if (!names.length) {
      this.summary.hidden = true;
      return 0;
    }
    this.summary.textContent = t("train.invalid", { count: names.length });
    this.summary.hidden = false;
    const first = this.control(names[0]);
    first.closest("details")?.setAttribute("open", "");
    for (const name of names) this.control(name).closest("details")?.setAttribute("open", "");
    if (focus) first.focus();
    return names.length;
  }

  /** A field's raw value: the checkbox's state, or the text as typed. */
  raw(field) {
    const control = this.control(field.name);
    return field.kind === "checkbox" ? control.checked : control.value;
  }

  /** Validate the whole form: {params} when valid, else null after showing the messages. */
  read() {
    const { params, errors } = collect((field) => this.raw(field));
    return this.showErrors(errors) ? null : params;
  }

  /** What was typed, for another page load to put back (`putBack`): each field's value where it reads as one
   * (so "2.048" typed on the German page is 2048 on the English one too), else the text as typed. */
  typed() {
    return Object.fromEntries(FIELDS.map((field) => {
      const [value, error] = checkField(field, this.raw(field));
      return [field.name, error ? this.raw(field) : value ?? ""];
    }));
  }

  /** The fields the user changed since the form was filled (`touched`), for another page load. */
  changed() {
    return [...this.touched];
  }

  /** Put back what `typed()` returned, numbers in this page's notation; `touched`: what `changed()` said. */
  putBack(values, touched = null) {
    for (const field of FIELDS) {
      if (!(field.name in values)) continue;
      const control = this.control(field.name);
      const value = values[field.name];
      if (field.kind === "checkbox") control.checked = Boolean(value);
      else control.value = typeof value === "number" ? formatPlain(value) : String(value ?? "");
      // what the user had changed stays theirs for a refill (`touched`); a page before this one said which
      if (!touched && (value === "" ? null : value) !== (this.defaults[field.name] ?? null)) {
        this.touched.add(field.name);
      }
    }
    if (touched) this.touched = new Set(touched);
  }

  /** Only the named fields (quick start sends a few of them), validated the same way. */
  readSome(names) {
    const { params, errors } = collect((field) => {
      if (!names.includes(field.name)) return field.kind === "checkbox" ? false : this.defaults[field.name] ?? "";
      return this.raw(field);
    });
    const relevant = Object.fromEntries(Object.entries(errors).filter(([n]) => names.includes(n)));
    if (this.showErrors(relevant)) return null;
    return Object.fromEntries(names.filter((n) => n in params).map((n) => [n, params[n]]));
  }
}
