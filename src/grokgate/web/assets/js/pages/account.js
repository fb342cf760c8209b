// One account (#/accounts?id=N, admin only): its balance and shared limits, its keys with their spending
// limits and this period's spend, and usage charts for the account and for one of its keys (&key=M).
// A new or rotated key's secret is shown once, here, until dismissed; the table only ever shows prefixes.

import { barChart } from "../charts.js";
import { clear, h } from "../dom.js";
import { addDays, compact, credits, dateTime, daysBetween, int, todayUTC } from "../format.js";
import { limitFields, limitsText, limitText, limitValues, resetText, showSecret, spendFields, spendValues, spentCell,
  state } from "../keys.js";
import { busy, errorBox, field, formDialog, pageHeader, table, toast } from "../ui.js";
import { accountLimitFields, accountLimitValues, accountState, toggleAccount, topUpDialog } from "./accounts.js";

const PERIODS = [7, 30, 90];
const GRACE = [
  { value: "3600", label: "1 hour" },
  { value: "0", label: "None: the old secret stops at once" },
  { value: "300", label: "5 minutes" },
  { value: "86400", label: "1 day" },
  { value: "604800", label: "7 days" },
];

/** Axis labels for micro-credits: whole credits shortened (1.2k), fractions exact (0.000025). */
const compactCredits = (micro) => (micro >= 1_000_000 ? compact(micro / 1_000_000) : credits(micro));

function card(label, value, note) {
  return h("div.card", h("div.card-label", label), h("div.card-value", value), note ? h("div.card-note", note) : null);
}

function panel(title) {
  const body = h("div.panel-body", h("p.loading", "Loading…"));
  const heading = h("h2", title);
  return { node: h("section.panel", heading, body), body, heading };
}

export async function render(root, ctx, params) {
  const { api } = ctx;
  const id = Number(params.get("id"));
  const days = PERIODS.includes(Number(params.get("days"))) ? Number(params.get("days")) : 30;
  const until = todayUTC();
  const since = addDays(until, -(days - 1));
  const axis = daysBetween(since, until);
  if (!Number.isSafeInteger(id) || id <= 0) {
    root.append(h("div.notice.notice-error", { role: "alert" }, h("p", "That is not an account id."),
      h("a.btn", { href: "#/accounts" }, "All accounts")));
    return undefined;
  }

  const [first, models, accountUsage] = await Promise.all([
    api.get(`/admin/accounts/${id}`),
    api.get("/v1/models"),
    api.get("/admin/usage", { by: "day", since, account: String(id) }),
  ]);
  const modelIds = models.data.map((m) => m.id);
  let account = first;

  const head = h("div.account-head");
  const cards = h("div.cards");
  const secretBox = h("div.secret-slot");
  const keysBox = h("div.key-list");
  const spend = panel("Credits per day · account");
  const requests = panel("Requests per day · account");
  const keySpend = panel("Credits per day · key");
  const keyRequests = panel("Requests per day · key");
  const keyPick = h("select", { "aria-label": "Key", name: "chart-key" });
  const period = h("select", { "aria-label": "Period", value: String(days),
    onchange: (e) => ctx.navigate("accounts", { id, days: e.target.value, key: keyPick.value }) },
  PERIODS.map((d) => h("option", { value: String(d) }, `Last ${d} days`)));
  root.append(head, cards, secretBox,
    h("section.panel.panel-keys", h("h2", "Keys"), keysBox),
    h("div.page-head.charts-head", h("h2", `Usage, ${since} to ${until} (UTC days)`),
      h("div.page-actions", h("label.inline", "Key ", keyPick), period)),
    h("div.grid", spend.node, requests.node, keySpend.node, keyRequests.node));

  const cleanups = [];
  const keyCleanups = [];

  function drawHead() {
    const a = account;
    const newKey = h("button.btn.btn-primary", { type: "button", dataset: { action: "new-key" } }, "New key");
    newKey.addEventListener("click", createKey);
    const topUp = h("button.btn", { type: "button", dataset: { action: "topup" } }, "Top up");
    topUp.addEventListener("click", async () => {
      const updated = await topUpDialog(api, a);
      if (!updated) return;
      toast(`${a.name} now has ${credits(updated.balance)} credits.`);
      await refresh();
    });
    const edit = h("button.btn", { type: "button", dataset: { action: "edit-account" } }, "Edit");
    edit.addEventListener("click", async () => {
      const updated = await formDialog({
        title: `Edit ${a.name}`,
        fields: [field({ name: "name", label: "Name", required: true, value: a.name }), ...accountLimitFields(a)],
        onSubmit: (v) => api.patch(`/admin/accounts/${a.id}`, { name: v.name, ...accountLimitValues(v) }),
      });
      if (!updated) return;
      toast(`${updated.name} saved.`);
      await refresh();
    });
    const toggle = h("button.btn", { type: "button", dataset: { action: a.disabled ? "enable" : "disable" } },
      a.disabled ? "Enable" : "Disable");
    toggle.addEventListener("click", () => busy(toggle, a.disabled ? "Enabling…" : "Disabling…", async () => {
      await toggleAccount(api, a);
      toast(`${a.name} ${a.disabled ? "enabled: its keys work again" : "disabled: all its keys are refused"}.`);
      await refresh();
    }));
    const ledgerLink = h("a.btn.btn-quiet", { href: `#/usage?account=${a.id}`, dataset: { action: "ledger" } },
      "Ledger");
    clear(head,
      h("p.crumbs", h("a", { href: "#/accounts" }, "← All accounts")),
      pageHeader(a.name, newKey, topUp, edit, toggle, ledgerLink));
    clear(cards,
      card("Balance", credits(a.balance), "credits, shared by all its keys"),
      card("Reserved", credits(a.reserved), "held for requests in flight"),
      card("Keys", int(a.keys)),
      card("Limits, all keys", limitsText(a)),
      card("State", accountState(a)));
    document.title = `${a.name} · Accounts · grokgate console`;
  }

  async function createKey() {
    const created = await formDialog({
      title: `New key of ${account.name}`,
      text: "The key spends from the account's balance, within its own spending limit if you set one.",
      submitLabel: "Create key",
      busyLabel: "Creating…",
      fields: [
        field({ name: "name", label: "Name", required: true, placeholder: "e.g. production app" }),
        ...spendFields(),
        ...limitFields(modelIds),
      ],
      onSubmit: (v) => {
        const body = { name: v.name, ...spendValues(v), ...limitValues(v) };
        for (const key of Object.keys(body)) if (body[key] === null) delete body[key];
        return api.post(`/admin/accounts/${account.id}/keys`, body);
      },
    });
    if (!created) return;
    showSecret(secretBox, created);
    toast(`Key ${created.key.name} created.`);
    await refresh();
  }

  function keyActions(k) {
    const usage = h("button.btn.btn-small.btn-quiet", { type: "button", dataset: { action: "key-usage" } }, "Usage");
    usage.addEventListener("click", () => {
      keyPick.value = String(k.id);
      showKey(k.id);
      keySpend.node.scrollIntoView({ block: "nearest" });
    });
    const limit = h("button.btn.btn-small", { type: "button", dataset: { action: "set-limit" } }, "Set limit");
    limit.addEventListener("click", async () => {
      const updated = await formDialog({
        title: `Spending limit of ${k.name}`,
        text: "What this key may spend per period; the account's balance still bounds it.",
        fields: spendFields(k.spend),
        onSubmit: (v) => api.patch(`/admin/keys/${k.id}`, spendValues(v)),
      });
      if (!updated) return;
      toast(`${updated.name}: limit ${limitText(updated.spend)}.`);
      await refresh();
    });
    const rotate = h("button.btn.btn-small", { type: "button", dataset: { action: "rotate" } }, "Rotate");
    rotate.addEventListener("click", async () => {
      const rotated = await formDialog({
        title: `Rotate ${k.name}`,
        text: "A new secret for the same key (same limits, same spend). The old secret keeps working for the " +
          "grace period, time enough to roll the new one out.",
        submitLabel: "Rotate secret",
        busyLabel: "Rotating…",
        danger: true,
        fields: [field({ name: "grace_seconds", label: "Old secret keeps working", type: "select", value: "3600",
          options: GRACE })],
        onSubmit: (v) => api.post(`/admin/keys/${k.id}/rotate`, { grace_seconds: Number(v.grace_seconds) }),
      });
      if (!rotated) return;
      showSecret(secretBox, rotated, `New secret of ${rotated.key.name}`);
      toast(`${rotated.key.name} rotated.`);
      await refresh();
    });
    const toggle = h("button.btn.btn-small", { type: "button", dataset: { action: k.disabled ? "enable" : "disable" } },
      k.disabled ? "Enable" : "Disable");
    toggle.addEventListener("click", () => busy(toggle, k.disabled ? "Enabling…" : "Disabling…", async () => {
      await api.patch(`/admin/keys/${k.id}`, { disabled: !k.disabled });
      toast(`${k.name} ${k.disabled ? "enabled" : "disabled"}.`);
      await refresh();
    }));
    return h("div.row-actions", usage, limit, rotate, toggle);
  }

  function keyState(k) {
    const grace = k.previous_valid_until && k.previous_valid_until * 1000 > Date.now();
    return h("span", state(k), grace ? h("small.hint.rotated",
      `old secret valid until ${dateTime(k.previous_valid_until)} UTC`) : null);
  }

  function drawKeys() {
    clear(keysBox, table([
      { label: "Name", cell: (k) => h("strong", k.name) },
      { label: "Prefix", cell: (k) => h("code", k.prefix) },
      { label: "Spending limit", cell: (k) => limitText(k.spend) },
      { label: "Spent this period", cls: "num", cell: (k) => spentCell(k.spend) },
      { label: "Held", cls: "num", cell: (k) => credits(k.spend.reserved) },
      { label: "Remaining", cls: "num", cell: (k) => (k.spend.remaining === null ? "" : credits(k.spend.remaining)) },
      { label: "Resets", cell: (k) => resetText(k.spend) },
      { label: "Rate limits", cell: limitsText },
      { label: "State", cell: keyState },
      { label: "", cls: "actions", cell: keyActions },
    ], account.data, { empty: "No keys yet: create one with New key.",
      rowAttrs: (k) => ({ dataset: { key: k.name, id: String(k.id) } }) }));
    const chosen = keyPick.value;
    clear(keyPick, account.data.map((k) => h("option", { value: String(k.id) }, k.name)));
    if (chosen && account.data.some((k) => String(k.id) === chosen)) keyPick.value = chosen;
  }

  async function refresh() {
    try {
      account = await api.get(`/admin/accounts/${id}`);
      drawHead();
      drawKeys();
    } catch (error) {
      toast(error.message, "error");
    }
  }

  function charts(target, rows, what) {
    const per = (key) => Object.fromEntries(rows.map((r) => [r.day, r[key]]));
    return [
      barChart(target[0].body, { days: axis, label: `Credits per day, ${what}`, format: (v) => `${credits(v)} credits`,
        axis: compactCredits, series: [{ name: "Credits", cls: "s-credits", values: per("cost") }] }),
      barChart(target[1].body, { days: axis, label: `Requests per day, ${what}`, format: int,
        series: [{ name: "Requests", cls: "s-requests", values: per("requests") }] }),
    ];
  }

  /** The key charts for key `keyId`, drawn in place; the fragment remembers the key without a re-render. */
  async function showKey(keyId) {
    keyCleanups.splice(0).forEach((stop) => stop());
    const k = account.data.find((x) => x.id === keyId);
    if (!k) {
      for (const p of [keySpend, keyRequests]) clear(p.body, h("p.empty", "This account has no keys yet."));
      return;
    }
    keySpend.heading.textContent = `Credits per day · key ${k.name}`;
    keyRequests.heading.textContent = `Requests per day · key ${k.name}`;
    history.replaceState(null, "", `#/accounts?id=${id}&days=${days}&key=${keyId}`);
    try {
      const rows = (await api.get("/admin/usage", { by: "day", since, token: String(keyId) })).data;
      if (keyPick.value !== String(keyId)) return; // another key was picked meanwhile
      keyCleanups.push(...charts([keySpend, keyRequests], rows, `key ${k.name}`));
      keySpend.node.dataset.key = String(keyId);
    } catch (error) {
      for (const p of [keySpend, keyRequests]) clear(p.body, errorBox(error));
    }
  }

  drawHead();
  drawKeys();
  cleanups.push(...charts([spend, requests], accountUsage.data, "account"));
  keyPick.addEventListener("change", () => showKey(Number(keyPick.value)));
  const wanted = Number(params.get("key"));
  const start = account.data.find((k) => k.id === wanted) || account.data[0];
  if (start) keyPick.value = String(start.id);
  await showKey(start ? start.id : null);
  return () => [...cleanups, ...keyCleanups].forEach((stop) => stop());
}
