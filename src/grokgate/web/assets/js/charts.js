// Charts as inline SVG, drawn at the container's real pixel width (so labels stay readable at 390 px instead of
// being scaled down from a desktop-sized viewBox) and redrawn when that width changes.

import { clear, h, s } from "./dom.js";
import { compact } from "./format.js";

const HEIGHT = 170;
const MARGIN = { top: 10, right: 8, bottom: 22 };
const CHAR_WIDTH = 6.6; // of an 11px axis label, near enough to size the left margin for the longest one

/**
 * A round step near max/3 so the grid reads 0, 50, 100 rather than 0, 47.3, 94.6. Every series here counts
 * whole things (requests, tokens, micro-credits), so steps are whole numbers too: no 2.5 below 10.
 */
function niceStep(max) {
  const raw = max / 3;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const factors = magnitude >= 10 ? [1, 2, 2.5, 5, 10] : [1, 2, 5, 10];
  const step = factors.map((m) => m * magnitude).find((v) => v >= raw);
  return Math.max(step || raw, 1);
}

/**
 * Stacked daily bars. `days`: every day on the axis, oldest first. `series`: [{name, cls, values: {day: n}}].
 * Each day is a <g data-day data-value> (tests and tooltips read it), one rect per series with a <title>.
 * `format` writes a value for tooltips, `axis` for the grid labels (default: short numbers such as 1.2k).
 */
export function barChart(container, { days, series, label, format = (v) => String(v), axis = compact }) {
  const svgBox = h("div.chart-canvas");
  const legend = series.length > 1
    ? h("ul.legend", series.map((x) => h("li", h("span.swatch", { class: `swatch ${x.cls}` }), x.name)))
    : null;
  clear(container, svgBox, legend || "");

  const totals = days.map((d) => series.reduce((sum, x) => sum + (x.values[d] || 0), 0));
  const draw = () => {
    const width = Math.max(svgBox.clientWidth, 240);
    clear(svgBox, render(width, days, series, totals, label, format, axis));
  };
  draw();
  // Redraw on resize (phone rotation, window resize); one frame later so layout has settled.
  let pending = 0;
  let lastWidth = svgBox.clientWidth;
  const observer = new ResizeObserver(() => {
    if (svgBox.clientWidth === lastWidth || pending) return;
    pending = requestAnimationFrame(() => {
      pending = 0;
      lastWidth = svgBox.clientWidth;
      draw();
    });
  });
  observer.observe(svgBox);
  return () => observer.disconnect();
}

function render(width, days, series, totals, label, format, axis) {
  const max = Math.max(...totals, 0);
  const step = niceStep(max || 1);
  const top = Math.max(step * Math.ceil((max || 1) / step), step);
  const ticks = [];
  for (let v = 0; v <= top + 1e-9; v += step) ticks.push([v, axis(v)]);
  // The left margin fits the longest grid label ("0.000025" is much wider than "2k").
  const left = Math.ceil(Math.max(...ticks.map(([, text]) => text.length)) * CHAR_WIDTH) + 10;
  const marginLeft = Math.max(left, 28);
  const plotW = width - marginLeft - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const y = (v) => MARGIN.top + plotH - (v / top) * plotH;
  const slot = plotW / Math.max(days.length, 1);
  const barW = Math.max(Math.min(slot * 0.72, 28), 1.5);

  const svg = s("svg", { width, height: HEIGHT, viewBox: `0 0 ${width} ${HEIGHT}`, role: "img", class: "chart",
    "aria-label": `${label}: ${totals.reduce((a, b) => a + b, 0)} in total over ${days.length} days` });

  // Horizontal grid with its labels.
  for (const [v, text] of ticks) {
    svg.append(
      s("line", { x1: marginLeft, x2: width - MARGIN.right, y1: y(v), y2: y(v), class: "grid" }),
      s("text", { x: marginLeft - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, text));
  }

  // Bars: stacked bottom-up in series order.
  days.forEach((day, i) => {
    const x = marginLeft + i * slot + (slot - barW) / 2;
    const group = s("g", { class: "bar", "data-day": day, "data-value": totals[i] });
    let base = 0;
    for (const x2 of series) {
      const value = x2.values[day] || 0;
      if (!value) continue;
      const rect = s("rect", { x, y: y(base + value), width: barW, height: Math.max(y(base) - y(base + value), 1),
        class: x2.cls, rx: Math.min(2, barW / 3) },
      s("title", `${day} · ${x2.name}: ${format(value)}`));
      group.append(rect);
      base += value;
    }
    svg.append(group);
  });

  // X labels as MM-DD: the first and the last day always, others every `every` days where they fit. The end
  // labels hug the plot's edges so the SVG border never cuts them; a label that would touch its neighbour or
  // the last one is left out.
  const every = Math.max(1, Math.ceil(days.length / Math.max(2, Math.floor(plotW / 64))));
  const labelW = 5 * CHAR_WIDTH + 8;
  const lastIndex = days.length - 1;
  const span = (i) => {
    const anchor = days.length > 1 && i === 0 ? "start" : i === lastIndex && days.length > 1 ? "end" : "middle";
    const x = marginLeft + i * slot + { start: 0, middle: slot / 2, end: slot }[anchor];
    const from = { start: x, middle: x - labelW / 2, end: x - labelW }[anchor];
    return { anchor, x, from, to: from + labelW };
  };
  const lastSpan = span(lastIndex);
  let previousEnd = -Infinity;
  days.forEach((day, i) => {
    if (i % every !== 0 && i !== lastIndex) return;
    const label = span(i);
    if (i !== lastIndex && (label.from < previousEnd || label.to > lastSpan.from)) return;
    previousEnd = label.to;
    svg.append(s("text", { x: label.x, y: HEIGHT - 6, class: "axis", "text-anchor": label.anchor }, day.slice(5)));
  });

  if (!max) {
    svg.append(s("text", { x: marginLeft + plotW / 2, y: MARGIN.top + plotH / 2, class: "chart-empty",
      "text-anchor": "middle" }, "No activity in this period"));
  }
  return svg;
}

/** Horizontal share bars (top models): one row per item, the bar scaled to the largest value. */
export function shareBars(items, { value, label, detail }) {
  const max = Math.max(...items.map(value), 1);
  return h("ul.shares", items.map((item) => {
    const bar = h("span.share-bar");
    bar.style.width = `${(100 * value(item)) / max}%`; // CSSOM, allowed by the page's style-src policy
    return h("li.share", { dataset: { item: label(item) } },
      h("div.share-text", h("span.share-label", label(item)), h("span.share-detail", detail(item))),
      h("div.share-track", bar));
  }));
}
