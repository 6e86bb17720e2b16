// The LoRA form: fields and bounds mirrored from `LoraParams` (src/lunatrain/params.py) so that a bad value
// is caught next to its field before anything is sent. The server validates again and stays the authority:
// its 422 names the field, and the page shows that message next to the same field.

import { t, errorText, formatNumber, formatFloat, groupSeparator } from "./i18n.js";

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

// kind: text | int | float | select | checkbox. gt/lt are exclusive bounds, min/max inclusive.
export const FIELDS = [
  { name: "adapterName", group: "adapter", kind: "text", nameRule: true, maxLength: 64, hint: "hint.adapterName" },
  { name: "adapterStrategy", group: "adapter", kind: "select", options: ["versioned", "overwrite"] },
  { name: "datasetTier", group: "adapter", kind: "select", options: ["curated", "memory", "merged"] },
  { name: "baseModel", group: "adapter", kind: "text", optional: true, maxLength: 512, hint: "hint.baseModel" },
  { name: "epochs", group: "schedule", kind: "int", min: 1, max: 100 },
  { name: "learningRate", group: "schedule", kind: "float", gt: 0, max: 1, step: "any" },
  { name: "batchSize", group: "schedule", kind: "int", min: 1, max: 1024 },
  { name: "gradientAccumulation", group: "schedule", kind: "int", min: 1, max: 1024 },
  { name: "maxSteps", group: "schedule", kind: "int", min: 1, max: 1_000_000, optional: true, hint: "hint.maxSteps" },
  { name: "rank", group: "lora", kind: "int", min: 1, max: 1024 },
  { name: "alpha", group: "lora", kind: "float", gt: 0, max: 4096, optional: true, hint: "hint.alpha" },
  { name: "dropout", group: "lora", kind: "float", min: 0, lt: 1 },
  { name: "maxSeqLength", group: "lora", kind: "int", min: 16, max: 131072 },
  { name: "packing", group: "lora", kind: "checkbox" },
  { name: "gradientCheckpointing", group: "advanced", kind: "select", options: ["auto", "true", "false"] },
  { name: "quantize", group: "advanced", kind: "select", options: ["none", "4bit", "8bit"] },
  { name: "warmupRatio", group: "advanced", kind: "float", min: 0, max: 0.5 },
  { name: "weightDecay", group: "advanced", kind: "float", min: 0, max: 1 },
  { name: "maxGradNorm", group: "advanced", kind: "float", gt: 0, max: 1000 },
  { name: "seed", group: "advanced", kind: "int", min: 0, max: 2 ** 32 - 1 },
  { name: "device", group: "advanced", kind: "select", options: ["auto", "cpu", "cuda"] },
  { name: "minCurated", group: "advanced", kind: "int", min: 0, max: 10_000_000 },
  { name: "gate", group: "advanced", kind: "checkbox" },
];

export const GROUPS = ["adapter", "schedule", "lora", "advanced"];

// LoraParams' own defaults, for the rare case that GET /lora/defaults cannot answer; normally the form
// shows the Luna profile as the server resolves it, so a changed profile file shows up here too.
export const FALLBACK_DEFAULTS = {
  adapterName: "luna-adapter",
  adapterStrategy: "versioned",
  datasetTier: "curated",
  baseModel: null,
  epochs: 3,
  learningRate: 0.0002,
  batchSize: 4,
  gradientAccumulation: 1,
  maxSteps: null,
  rank: 16,
  alpha: null,
  dropout: 0.05,
  maxSeqLength: 1024,
  packing: true,
  gradientCheckpointing: "auto",
  quantize: "none",
  warmupRatio: 0.05,
  weightDecay: 0,
  maxGradNorm: 1,
  seed: 42,
  device: "auto",
  minCurated: 0,
  gate: true,
};

/** The allowed range of a numeric field, as words ("1 bis 1024"). */
export function rangeText(field) {
  const n = (v) => (Number.isInteger(v) ? formatNumber(v) : formatFloat(v));
  if (field.gt !== undefined) return t("train.rangeGt", { min: n(field.gt), max: n(field.max) });
  if (field.lt !== undefined) return t("train.rangeLt", { min: n(field.min), max: n(field.lt) });
  return t("train.range", { min: n(field.min), max: n(field.max) });
}

/**
 * Check one raw form value. Returns [value, null] with the typed value (null for an empty optional field)
 * or [undefined, message].
 */
export function checkField(field, raw) {
  if (field.kind === "checkbox") return [Boolean(raw), null];
  const text = String(raw ?? "").trim();
  if (text === "") return field.optional ? [null, null] : [undefined, t("err.required")];
  if (field.kind === "select") return field.options.includes(text) ? [text, null] : [undefined, t("err.choice")];
  if (field.kind === "text") {
    if (text.length > field.maxLength) return [undefined, t("err.tooLong", { max: field.maxLength })];
    if (field.nameRule && (!NAME_RE.test(text) || text.includes(".."))) return [undefined, t("err.name")];
    return [text, null];
  }
  // A number may be grouped the way the hints write it ("4.096" and "1.000,5" in German, "4,096" and
  // "1,000.5" in English), so "2.048" on the German page is two thousand and forty-eight, not two. Otherwise
  // either mark is a decimal mark ("0,5" and "0.5" alike; "0.002" is no grouping, a group never starts
  // with 0).
  const group = groupSeparator === "." ? "\\." : groupSeparator;
  const decimal = groupSeparator === "." ? "," : "\\.";
  const grouped = new RegExp(`^[+-]?[1-9]\\d{0,2}(${group}\\d{3})+(${decimal}\\d*)?$`);
  let normal = grouped.test(text) ? text.split(groupSeparator).join("") : text;
  normal = normal.replace(",", ".");
  // A whole number has no decimal mark: "10.000" must not be read as ten (nor "1,000" on the German page as one).
  if (field.kind === "int" && /[.,]/.test(normal)) return [undefined, t("err.integer")];
  if (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(normal)) {
    return [undefined, t(field.kind === "int" ? "err.integer" : "err.number")];
  }
  const value = Number(normal);
  if (field.kind === "int" && !Number.isInteger(value)) return [undefined, t("err.integer")];
  const low = field.gt !== undefined ? value <= field.gt : value < field.min;
  const high = field.lt !== undefined ? value >= field.lt : value > field.max;
  if (low || high) return [undefined, t("err.range", { range: rangeText(field) })];
  return [value, null];
}

/**
 * Validate every field; returns {params, errors} where errors maps field name → message. An optional field
 * left empty is sent as null: cleared, not the profile's value (no maxSteps cap, the configured base model).
 */
export function collect(readRaw) {
  const params = {};
  const errors = {};
  for (const field of FIELDS) {
    const [value, error] = checkField(field, readRaw(field));
    if (error) errors[field.name] = error;
    else if (value !== null || field.optional) params[field.name] = value;
  }
  return { params, errors };
}

/**
 * Field messages from a server 422: pydantic-style `details` ([{loc, msg}]) when present, else the
 * "Invalid parameters: rank: msg; epochs: msg." sentence that `format_validation_error` writes.
 */
export function serverFieldErrors(error) {
  const names = new Set(FIELDS.map((f) => f.name));
  const toCamel = (s) => String(s).replace(/_([a-z])/g, (_, c) => c.toUpperCase());
  const found = {};
  // A coded error about one field's value (its parameters name the field: baseModel) is said next to that
  // field in the page's words.
  const field = Object.keys(error.params ?? {}).find((key) => names.has(key));
  if (field) return { [field]: errorText(error) };
  const details = Array.isArray(error.details) ? error.details : [];
  for (const item of details) {
    const loc = Array.isArray(item?.loc) ? item.loc : [];
    const name = loc.map(toCamel).find((part) => names.has(part));
    if (name && item.msg) found[name] = item.msg;
  }
  if (Object.keys(found).length) return found;
  const message = String(error.message || "");
  const body = message.replace(/^[^:]*?parameters:\s*/i, "");
  for (const part of body.split(/;\s*/)) {
    const m = part.match(/^\s*([A-Za-z_]+)(?:\.[\w.]+)?:\s*(.+?)\.?\s*$/);
    if (m && names.has(toCamel(m[1]))) found[toCamel(m[1])] = m[2];
  }
  // A sentence about one field ("baseModel './x' is neither …") belongs next to that field as a whole.
  const lead = message.match(/^([A-Za-z]+)\b/);
  if (!Object.keys(found).length && lead && names.has(lead[1])) found[lead[1]] = message;
  return found;
}
