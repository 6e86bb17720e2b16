// A small SVG line chart for the live loss curve (train and val per step, the base model's val loss as a
// reference). Drawn by hand rather than with a chart library: two series, linear axes and a legend are all
// the page needs. The drawing uses the element's real pixel width, so the text stays 12px from phone to
// desktop; the legend is HTML below the chart so it never covers the curves. The last values are also in
// the SVG's <desc>, so the chart is not the only way to read them.

import { t, formatFloat, formatLoss, formatNumber } from "./i18n.js";

const NS = "http://www.w3.org/2000/svg";
const PAD = { left: 48, right: 12, top: 10, bottom: 34 };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Round tick values spanning [lo, hi]: steps of 1, 2 or 5 × 10^k, about `count` of them. */
function ticks(lo, hi, count) {
  if (hi <= lo) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/**
 * Draw `series` ({train: [[step, loss]…], val: [[step, loss]…], base: number|null, total: steps|null}) into
 * the <svg> `svg` and its legend into `legend` (a <ul>), replacing what was there. `base` is the base model's
 * val loss: the adapter is worth having when its val curve ends below that line. An empty series draws a
 * "no values" note.
 */
export function drawLossChart(svg, legend, series) {
  const train = (series.train ?? []).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const val = (series.val ?? []).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const base = Number.isFinite(series.base) ? series.base : null;
  const W = Math.max(240, Math.round(svg.parentElement?.clientWidth || 640));
  const H = Math.round(Math.min(260, Math.max(180, W * 0.4)));
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  svg.setAttribute("role", "img");
  const last = (pts) => (pts.length ? formatLoss(pts[pts.length - 1][1]) : "–");
  svg.append(el("title", {}, t("job.chartLabel")));
  svg.append(el("desc", {}, `${t("job.trainLoss")}: ${last(train)}; ${t("job.valLoss")}: ${last(val)}; `
    + `${t("job.baseLoss")}: ${formatLoss(base)}`));

  const items = [["chart-train", `${t("job.trainLoss")} ${last(train)}`], ["chart-val", `${t("job.valLoss")} ${last(val)}`]];
  if (base !== null) items.push(["chart-base", `${t("job.baseLoss")} ${formatLoss(base)}`]);
  legend.replaceChildren(...items.map(([cls, text]) => {
    const li = document.createElement("li");
    const swatch = el("svg", { width: 24, height: 10, "aria-hidden": "true" });
    swatch.append(el("line", { x1: 0, x2: 24, y1: 5, y2: 5, class: cls }));
    li.append(swatch, text);
    return li;
  }));

  const x0 = PAD.left;
  const x1 = W - PAD.right;
  const y0 = H - PAD.bottom;
  const y1 = PAD.top;
  svg.append(el("rect", { x: x0, y: y1, width: x1 - x0, height: y0 - y1, class: "chart-frame" }));
  const all = [...train, ...val];
  if (!all.length) {
    svg.append(el("text", { x: (x0 + x1) / 2, y: (y0 + y1) / 2, "text-anchor": "middle", class: "chart-note" },
      t("job.chartEmpty")));
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = [...all.map((p) => p[1]), ...(base === null ? [] : [base])];
  const xmin = Math.min(0, ...xs);
  const xmax = Math.max(1, series.total ?? 0, ...xs); // the whole run's width: the curve grows into it
  let ymin = Math.min(...ys);
  let ymax = Math.max(...ys);
  const pad = (ymax - ymin) * 0.08 || Math.abs(ymax) * 0.1 || 1;
  ymin = Math.max(0, ymin - pad);
  ymax += pad;
  const sx = (x) => x0 + ((x - xmin) / (xmax - xmin)) * (x1 - x0);
  const sy = (y) => y0 - ((y - ymin) / (ymax - ymin)) * (y0 - y1);

  const grid = el("g", { class: "chart-grid" });
  const yTicks = ticks(ymin, ymax, 4);
  // As many decimals as the step between ticks needs: losses close together (ticks 0.005 apart) would print
  // the same label twice with a fixed number of significant digits.
  // A single tick has no step: its own value, to three significant digits.
  const decimals = yTicks.length > 1 ? Math.max(0, -Math.floor(Math.log10(yTicks[1] - yTicks[0]) + 1e-9)) : null;
  for (const v of yTicks) {
    grid.append(el("line", { x1: x0, x2: x1, y1: sy(v), y2: sy(v) }));
    const label = decimals === null ? formatFloat(v, 3) : formatNumber(v, decimals);
    grid.append(el("text", { x: x0 - 6, y: sy(v) + 4, "text-anchor": "end" }, label));
  }
  for (const v of ticks(xmin, xmax, Math.max(2, Math.floor((x1 - x0) / 70))).filter(Number.isInteger)) {
    // Grouped as the job's facts write the same steps ("12.000 / 20.000"), not as bare digits.
    grid.append(el("text", { x: sx(v), y: y0 + 16, "text-anchor": "middle" }, formatNumber(v)));
  }
  grid.append(el("text", { x: x1, y: H - 3, "text-anchor": "end" }, t("job.step")));
  svg.append(grid);

  const path = (pts) => pts.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
  if (base !== null) svg.append(el("line", { x1: x0, x2: x1, y1: sy(base), y2: sy(base), class: "chart-base" }));
  if (train.length) svg.append(el("path", { d: path(train), class: "chart-train" }));
  if (val.length) {
    svg.append(el("path", { d: path(val), class: "chart-val" }));
    for (const [x, y] of val) svg.append(el("circle", { cx: sx(x), cy: sy(y), r: 3.5, class: "chart-val-dot" }));
  }
}
