// Usage: the ledger, newest first, filtered by account and token (admin), model, status, kind, API (chat
// completions or responses) and UTC dates, a page at a time (cursor pagination, so deep pages cost the same as the first), with CSV export of the filtered rows.
// Each usage row shows the share of its prompt read from the backend's prompt cache, and a line above the table
// sums that share per model and backend over the rows shown (prompt-cache affinity keeps a conversation where
// its cache is: serving/affinity.py).

import { clear, formValues, h } from "../dom.js";
import { addDays, credits, dateTime, int, signedCredits, todayUTC } from "../format.js";
import { busy, download, errorBox, field, loading, pageHeader, pill, table, toast } from "../ui.js";

const PAGE_SIZES = [25, 50, 100, 200];
const EXPORT_LIMIT = 10_000;
const STATUSES = [
  { value: "", label: "Any status" },
  { value: "ok", label: "ok" },
  { value: "!ok", label: "Failed (not ok)" },
  { value: "error", label: "error" },
  { value: "client_disconnected", label: "client_disconnected" },
];
const ENDPOINTS = [
  { value: "", label: "Any API" },
  { value: "chat", label: "Chat completions" },
  { value: "responses", label: "Responses" },
];

export async function render(root, ctx, params) {
  const admin = ctx.session.role === "admin";
  const path = admin ? "/admin/ledger/search" : "/v1/ledger";
  const today = todayUTC();
  const filters = {
    token: admin ? params.get("token") || "" : "",
    account: admin ? params.get("account") || "" : "",
    model: params.get("model") || "",
    status: params.get("status") || "",
    kind: params.get("kind") || "",
    endpoint: params.get("endpoint") || "",
    since: params.get("since") ?? addDays(today, -29),
    until: params.get("until") ?? today,
    limit: PAGE_SIZES.includes(Number(params.get("limit"))) ? Number(params.get("limit")) : 50,
  };

  const [models, keys, accounts] = await Promise.all([
    ctx.api.get("/v1/models"),
    admin ? ctx.api.get("/admin/keys") : Promise.resolve(null),
    admin ? ctx.api.get("/admin/accounts") : Promise.resolve(null),
  ]);
  const names = new Map((keys ? keys.data : []).map((k) => [k.id, k.name]));
  const accountNames = new Map((accounts ? accounts.data : []).map((a) => [a.id, a.name]));
  const modelIds = models.data.map((m) => m.id);
  if (filters.model && !modelIds.includes(filters.model)) modelIds.push(filters.model);

  const exportButton = h("button.btn", { type: "button", dataset: { action: "export" } }, "Export CSV");
  const form = h("form.filters", { "aria-label": "Filters" },
    admin ? field({ name: "token", label: "Token", type: "select", value: filters.token,
      options: [{ value: "", label: "All tokens" },
        ...[...names].map(([id, name]) => ({ value: String(id), label: name }))] }) : null,
    admin ? field({ name: "account", label: "Account", type: "select", value: filters.account,
      options: [{ value: "", label: "All accounts" },
        ...[...accountNames].map(([id, name]) => ({ value: String(id), label: name }))] }) : null,
    field({ name: "model", label: "Model", type: "select", value: filters.model,
      options: [{ value: "", label: "Any model" }, ...modelIds.map((m) => ({ value: m, label: m }))] }),
    field({ name: "status", label: "Status", type: "select", value: filters.status, options: STATUSES }),
    field({ name: "kind", label: "Kind", type: "select", value: filters.kind,
      options: [{ value: "", label: "All kinds" }, { value: "usage", label: "Usage" },
        { value: "topup", label: "Top-ups" }] }),
    field({ name: "endpoint", label: "API", type: "select", value: filters.endpoint, options: ENDPOINTS }),
    field({ name: "since", label: "From (UTC)", type: "date", value: filters.since }),
    field({ name: "until", label: "To (UTC)", type: "date", value: filters.until }),
    field({ name: "limit", label: "Rows per page", type: "select", value: String(filters.limit),
      options: PAGE_SIZES.map((n) => ({ value: String(n), label: String(n) })) }),
    h("div.filter-actions",
      h("button.btn.btn-primary", { type: "submit" }, "Apply"),
      h("button.btn.btn-quiet", { type: "button", onclick: () => ctx.navigate("usage", { since: "", until: "" }) },
        "Reset")));
  // Filters live in the fragment, so a filtered view can be bookmarked or linked (the overview links to
  // failed requests); applying them re-renders the page from there.
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    ctx.navigate("usage", formValues(form));
  });

  const results = h("div.results");
  const pager = h("div.pager");
  root.append(pageHeader(admin ? "Usage" : "My usage", exportButton), form, results, pager);

  const query = { ...filters };
  for (const key of Object.keys(query)) if (query[key] === "") delete query[key];
  const cursors = [""]; // cursors[i] opens page i; "Newer" walks back through them
  let page = 0;

  // No key: the bootstrap admin token's own request, or a top-up of an account (which names its account).
  const tokenName = (r) => {
    if (r.token_id !== null) return names.get(r.token_id) || `#${r.token_id}`;
    return r.account_id == null ? "admin token" : "";
  };
  const accountName = (r) => (r.account_id == null ? "" : accountNames.get(r.account_id) || `#${r.account_id}`);
  const columns = [
    { label: "Time (UTC)", cell: (r) => dateTime(r.created_at) },
    admin ? { label: "Account", cell: accountName } : null,
    admin ? { label: "Token", cell: tokenName } : null,
    { label: "Kind", cell: (r) => r.kind },
    { label: "Model", cell: (r) => r.model || "" },
    { label: "API", cell: (r) => (r.kind === "usage" ? apiLabel(r) : "") },
    { label: "Tokens in / out", cls: "num", cell: (r) => (r.kind === "usage"
      ? `${int(r.prompt_tokens)} / ${int(r.completion_tokens)}` : "") },
    { label: "Cached", cls: "num", cell: (r) => (r.kind === "usage" ? cachedShare(r) : "") },
    { label: "Cost", cls: "num", cell: (r) => (r.kind === "usage" ? credits(r.cost) : "") },
    { label: "Balance change", cls: "num", cell: (r) => signedCredits(r.amount) },
    { label: "Status", cell: (r) => pill(r.status, r.status === "ok" ? "ok" : "bad") },
    { label: "Time taken", cls: "num", cell: (r) => (r.duration_ms != null ? `${int(r.duration_ms)} ms` : "") },
    { label: "Note", cell: (r) => r.note || (r.estimated ? "estimated usage" : "") },
  ].filter(Boolean);

  async function load() {
    loading(results);
    const answer = await ctx.api.get(path, { ...query, cursor: cursors[page] || undefined });
    if (answer.next_cursor) cursors[page + 1] = answer.next_cursor;
    clear(results, cacheSummary(answer.data), table(columns, answer.data, {
      empty: page ? "No more rows." : "No ledger rows match these filters.",
      rowAttrs: (r) => ({ dataset: { row: String(r.id), kind: r.kind, status: r.status, model: r.model || "",
        endpoint: r.endpoint || "" } }),
    }));
    const newer = h("button.btn", { type: "button", disabled: page === 0, dataset: { action: "newer" } }, "← Newer");
    const older = h("button.btn", { type: "button", disabled: !answer.has_more, dataset: { action: "older" } },
      "Older →");
    newer.addEventListener("click", () => busy(newer, "Loading…", () => { page -= 1; return load(); }));
    older.addEventListener("click", () => busy(older, "Loading…", () => { page += 1; return load(); }));
    clear(pager, newer, h("span.page-no", `Page ${page + 1}`), older);
  }

  exportButton.addEventListener("click", () => busy(exportButton, "Exporting…", async () => {
    const { text, headers } = await ctx.api.text(path, { ...query, limit: EXPORT_LIMIT, format: "csv" });
    const rows = text ? text.trimEnd().split("\r\n").length - 1 : 0; // csv module ends rows with CRLF
    download(`grokgate-ledger-${filters.since || "start"}-${filters.until || today}.csv`, text);
    if (headers.get("x-next-cursor")) {
      toast(`Exported the newest ${int(rows)} rows; narrow the dates to export the rest.`, "warn");
    } else {
      toast(`Exported ${int(rows)} rows.`);
    }
  }));

  try {
    await load();
  } catch (error) {
    clear(results, errorBox(error, () => load().catch(() => {})));
  }
}

/** The share of a row's prompt tokens read from the prompt cache ("" when it had none). */
function cachedShare(r) {
  const prompt = Number(r.prompt_tokens || 0);
  if (!prompt) return "";
  const cached = Math.min(Number(r.cached_tokens || 0), prompt);
  return h("span", { title: `${int(cached)} of ${int(prompt)} prompt tokens cached` }, percent(cached / prompt));
}

/** Cached share of prompt tokens per model and backend over the rows shown; null when none had a prompt. */
function cacheSummary(rows) {
  const groups = new Map();
  for (const r of rows) {
    if (r.kind !== "usage" || !Number(r.prompt_tokens)) continue;
    const key = `${r.model || "?"} · ${r.backend || "?"}`;
    const g = groups.get(key) || { prompt: 0, cached: 0 };
    g.prompt += Number(r.prompt_tokens);
    g.cached += Math.min(Number(r.cached_tokens || 0), Number(r.prompt_tokens));
    groups.set(key, g);
  }
  if (!groups.size) return null;
  const parts = [...groups].map(([key, g]) =>
    h("span.cache-share", { dataset: { group: key } },
      `${key}: ${percent(g.cached / g.prompt)} of ${int(g.prompt)} prompt tokens cached`));
  return h("p.muted.cache-summary", "Prompt cache, rows shown: ",
    ...parts.flatMap((part, i) => (i ? [" · ", part] : [part])));
}

function percent(x) {
  return `${(x * 100).toFixed(x > 0 && x < 0.1 ? 1 : 0)}%`;
}

/** Which API a charge came from, and the server-side tool calls it paid for (priced per call). */
function apiLabel(r) {
  const name = r.endpoint === "responses" ? "responses" : "chat";
  const calls = Number(r.server_tool_calls || 0);
  return calls ? `${name} · ${int(calls)} tool call${calls === 1 ? "" : "s"}` : name;
}
