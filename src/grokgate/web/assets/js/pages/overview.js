// Overview: traffic, tokens and credits per day, failed requests, top models and backend health.
// Everything here comes from the pre-aggregated usage_daily table (/usage?by=day|model) and one indexed range
// of the ledger (/ledger/errors), fetched in parallel, so the page is quick even over a large ledger.

import { barChart, shareBars } from "../charts.js";
import { clear, h } from "../dom.js";
import { addDays, compact, credits, daysBetween, int, plural, todayUTC } from "../format.js";
import { limitText, resetText } from "../keys.js";
import { errorBox, pill } from "../ui.js";

const PERIODS = [7, 30, 90];

function panel(title, cls = "") {
  const body = h("div.panel-body", h("p.loading", "Loading…"));
  const node = h("section.panel", { class: `panel ${cls}` }, h("h2", title), body);
  return { node, body };
}

function card(label, value, note) {
  return h("div.card", h("div.card-label", label), h("div.card-value", value), note ? h("div.card-note", note) : null);
}

const sum = (rows, key) => rows.reduce((total, r) => total + (r[key] || 0), 0);

/** Axis labels for micro-credits: whole credits shortened (1.2k), fractions exact (0.000025). */
const compactCredits = (micro) => (micro >= 1_000_000 ? compact(micro / 1_000_000) : credits(micro));

export async function render(root, ctx, params) {
  const admin = ctx.session.role === "admin";
  const base = admin ? "/admin" : "/v1";
  const days = PERIODS.includes(Number(params.get("days"))) ? Number(params.get("days")) : 30;
  const until = todayUTC();
  const since = addDays(until, -(days - 1));
  const axis = daysBetween(since, until);

  const period = h("select", { "aria-label": "Period", value: String(days),
    onchange: (e) => ctx.navigate("overview", { days: e.target.value }) },
  PERIODS.map((d) => h("option", { value: String(d) }, `Last ${d} days`)));
  const cards = h("div.cards");
  const requests = panel("Requests per day");
  const tokens = panel("Tokens per day");
  const spend = panel("Credits per day");
  const errors = panel("Failed requests");
  const models = panel("Top models");
  const health = panel("Backends");
  root.append(
    h("div.page-head", h("h1", "Overview"), h("div.page-actions", period)),
    h("p.sub", `${since} to ${until} (UTC days)`),
    cards,
    h("div.grid", requests.node, tokens.node, spend.node, errors.node, models.node, health.node));

  // All requests at once; a panel whose data failed shows why, the others still render.
  const [byDay, byModel, failed, ready, balance] = await Promise.allSettled([
    ctx.api.get(`${base}/usage`, { by: "day", since }),
    ctx.api.get(`${base}/usage`, { by: "model", since }),
    ctx.api.get(`${base}/ledger/errors`, { since, until }),
    ctx.api.get("/readyz", undefined, { allow: [503] }), // 503 while a model loads still carries the JSON
    admin ? ctx.api.get("/admin/keys") : ctx.refreshAccount(),
  ]);

  const cleanups = [];
  if (byDay.status === "fulfilled") {
    const rows = byDay.value.data;
    const per = (key) => Object.fromEntries(rows.map((r) => [r.day, r[key]]));
    cleanups.push(
      barChart(requests.body, { days: axis, label: "Requests per day", format: int,
        series: [{ name: "Requests", cls: "s-requests", values: per("requests") }] }),
      barChart(tokens.body, { days: axis, label: "Tokens per day", format: int,
        series: [{ name: "Input", cls: "s-input", values: per("prompt_tokens") },
          { name: "Output", cls: "s-output", values: per("completion_tokens") }] }),
      barChart(spend.body, { days: axis, label: "Credits per day", format: (v) => `${credits(v)} credits`,
        axis: compactCredits, series: [{ name: "Credits", cls: "s-credits", values: per("cost") }] }));
    const total = sum(rows, "prompt_tokens") + sum(rows, "completion_tokens");
    cards.append(
      card("Requests", int(sum(rows, "requests"))),
      card("Tokens", compact(total), `${int(total)} tokens`),
      card("Credits spent", credits(sum(rows, "cost"))));
  } else {
    for (const p of [requests, tokens, spend]) clear(p.body, errorBox(byDay.reason));
  }

  if (failed.status === "fulfilled") {
    const e = failed.value;
    cards.append(card("Failed requests", int(e.total)));
    const perDay = Object.fromEntries(e.by_day.map((r) => [r.day, r.count]));
    const statuses = Object.entries(e.by_status).sort((a, b) => b[1] - a[1]);
    const link = h("a.btn.btn-quiet", { href: `#/usage?status=!ok&since=${since}&until=${until}` },
      "Show failed requests");
    clear(errors.body, 
      h("p.big", plural(e.total, "failed request"), " ",
        h("span.muted", e.total ? "(status other than ok)" : "in this period")),
      statuses.length ? h("ul.status-list", statuses.map(([status, n]) => h("li", pill(status, "bad"), ` ${int(n)}`)))
        : null,
      h("div.chart-slot"),
      link);
    if (e.total) {
      cleanups.push(barChart(errors.body.querySelector(".chart-slot"), { days: axis, label: "Failed requests",
        format: int, series: [{ name: "Failed", cls: "s-errors", values: perDay }] }));
    }
  } else {
    clear(errors.body, errorBox(failed.reason));
  }

  if (byModel.status === "fulfilled") {
    const top = [...byModel.value.data].sort((a, b) => b.requests - a.requests).slice(0, 8);
    clear(models.body, top.length
      ? shareBars(top, { value: (m) => m.requests, label: (m) => m.model,
        detail: (m) => `${plural(m.requests, "request")} · ${compact(m.prompt_tokens + m.completion_tokens)} tokens · ${credits(m.cost)} credits` })
      : h("p.empty", "No requests in this period."));
  } else {
    clear(models.body, errorBox(byModel.reason));
  }

  if (ready.status === "fulfilled") {
    clear(health.body, backends(ready.value));
  } else {
    clear(health.body, errorBox(ready.reason));
  }

  if (balance.status === "fulfilled" && balance.value) {
    if (admin) {
      const keys = balance.value.data;
      ctx.session.keys = keys;
      cards.append(card("Account tokens", int(keys.filter((k) => !k.disabled).length),
        `${int(keys.length)} in all`));
    } else {
      // Two different things, shown apart: the account's balance (all its keys share it), and this key's own
      // spending limit with what it spent this period.
      const b = balance.value;
      cards.prepend(
        card("Account balance", `${credits(b.balance)}`, `credits of ${b.account.name}, shared by its keys`),
        keyCard(b.key));
    }
  }
  return () => cleanups.forEach((stop) => stop());
}

/** The calling key's spending limit: spent this period of its limit, and when the period resets. */
function keyCard(spend) {
  if (!spend || spend.limit === null) {
    return h("div.card.card-key", h("div.card-label", "This key"), h("div.card-value", "no limit"),
      h("div.card-note", "only the account's balance bounds it"));
  }
  return h("div.card.card-key", h("div.card-label", "This key, this period"),
    h("div.card-value", credits(spend.spent)),
    h("div.card-note", `spent of ${limitText(spend)}`, h("br"),
      spend.resets_at ? `resets ${resetText(spend)}` : "never resets"));
}

/** /readyz: one row per backend with the facts that say whether it can take work. */
function backends(body) {
  const entries = Object.entries(body.backends || {});
  const overall = h("p", "Gateway: ", body.status === "ready" ? pill("ready", "ok") : pill(body.status, "warn"));
  return h("div", overall, h("ul.backends", entries.map(([name, st]) => {
    const up = st.ready !== false && st.state !== "open";
    const facts = [];
    if (st.model) facts.push(st.model);
    if (st.slots !== undefined) facts.push(`${st.slots_busy}/${st.slots} slots busy`, `${st.queued} queued`);
    if (st.kind) facts.push(st.kind);
    if (st.state) facts.push(`breaker ${st.state}`);
    if (st.routes) facts.push(st.routes.map((r) => `${r.backend}:${r.model}`).join(", "));
    if (st.error) facts.push(st.error);
    return h("li.backend", { dataset: { backend: name } },
      h("span.backend-name", name), up ? pill("up", "ok") : pill(st.ready === false ? "loading" : "down", "bad"),
      h("span.backend-facts", facts.join(" · ")));
  })));
}
