// Accounts (admin only): the customers. An account holds the balance that all its keys spend from. This page
// lists them (balance, reserved, shared limits, state), creates, tops up, disables and enables them;
// #/accounts?id=N opens one account: its keys with their spending limits, and its usage (pages/account.js).

import { clear, h } from "../dom.js";
import { credits, int } from "../format.js";
import { limitsText } from "../keys.js";
import { busy, errorBox, field, formDialog, loading, pageHeader, pill, table, toast } from "../ui.js";

const positive = (text) => (text === "" ? null : Number(text));

/** The account-wide limits (all its keys together) as fields. */
export function accountLimitFields(a = {}) {
  return [
    field({ name: "rpm", label: "Requests per minute, all keys", type: "number", min: 1, step: 1,
      value: a.rpm ?? "", hint: "Empty: no limit" }),
    field({ name: "tpm", label: "Tokens per minute, all keys", type: "number", min: 1, step: 1,
      value: a.tpm ?? "", hint: "Empty: no limit" }),
    field({ name: "max_concurrency", label: "Requests at once, all keys", type: "number", min: 1, step: 1,
      value: a.max_concurrency ?? "", hint: "Empty: no limit" }),
  ];
}

export function accountLimitValues(v) {
  return { rpm: positive(v.rpm), tpm: positive(v.tpm), max_concurrency: positive(v.max_concurrency) };
}

export function accountState(a) {
  return a.disabled ? pill("disabled", "bad") : pill("active", "ok");
}

/** A dialog that tops up `a`; resolves with the account as changed, or null when cancelled. */
export function topUpDialog(api, a) {
  return formDialog({
    title: `Top up ${a.name}`,
    text: "Every key of the account spends from this balance.",
    submitLabel: "Add credits",
    busyLabel: "Adding…",
    fields: [
      field({ name: "amount", label: "Credits to add", required: true, placeholder: "e.g. 5" }),
      field({ name: "note", label: "Note (optional)", placeholder: "e.g. invoice 42" }),
    ],
    onSubmit: (v) => api.post(`/admin/accounts/${a.id}/credits`, { amount: v.amount, note: v.note || null }),
  });
}

/** Disable or enable `a` (a disabled account's keys are all refused); resolves with the account as changed. */
export function toggleAccount(api, a) {
  return api.patch(`/admin/accounts/${a.id}`, { disabled: !a.disabled });
}

export async function render(root, ctx, params) {
  const id = params.get("id");
  if (id) {
    const detail = await import("./account.js");
    return detail.render(root, ctx, params);
  }
  const { api } = ctx;
  const list = h("div.account-list");
  const newButton = h("button.btn.btn-primary", { type: "button", dataset: { action: "new-account" } },
    "New account");
  root.append(pageHeader("Accounts", newButton),
    h("p.sub", "An account is a customer: it holds the balance, and all its keys spend from it. Each key may " +
      "also have its own spending limit."),
    list);
  loading(list);

  async function reload() {
    draw((await api.get("/admin/accounts")).data);
  }

  newButton.addEventListener("click", async () => {
    const created = await formDialog({
      title: "New account",
      submitLabel: "Create account",
      busyLabel: "Creating…",
      fields: [
        field({ name: "name", label: "Name", required: true, placeholder: "e.g. Acme Inc." }),
        field({ name: "credits", label: "Initial credits", placeholder: "e.g. 10 or 0.5", hint: "Empty: 0" }),
        ...accountLimitFields(),
      ],
      onSubmit: (v) => {
        const body = { name: v.name, ...accountLimitValues(v) };
        if (v.credits) body.credits = v.credits;
        for (const key of Object.keys(body)) if (body[key] === null) delete body[key];
        return api.post("/admin/accounts", body);
      },
    });
    if (!created) return;
    toast(`Account ${created.name} created with ${credits(created.balance)} credits.`);
    await reload().catch((e) => clear(list, errorBox(e, reload)));
  });

  function actions(a) {
    const topUp = h("button.btn.btn-small", { type: "button", dataset: { action: "topup" } }, "Top up");
    topUp.addEventListener("click", async () => {
      const updated = await topUpDialog(api, a);
      if (!updated) return;
      toast(`${a.name} now has ${credits(updated.balance)} credits.`);
      await reload().catch((e) => toast(e.message, "error"));
    });
    const toggle = h("button.btn.btn-small", { type: "button", dataset: { action: a.disabled ? "enable" : "disable" } },
      a.disabled ? "Enable" : "Disable");
    toggle.addEventListener("click", () => busy(toggle, a.disabled ? "Enabling…" : "Disabling…", async () => {
      await toggleAccount(api, a);
      toast(`${a.name} ${a.disabled ? "enabled" : "disabled"}.`);
      await reload();
    }));
    const open = h("a.btn.btn-small.btn-quiet", { href: `#/accounts?id=${Number(a.id)}`, dataset: { action: "open" } },
      "Keys & usage");
    return h("div.row-actions", open, topUp, toggle);
  }

  function draw(rows) {
    clear(list, table([
      { label: "Name", cell: (a) => h("a", { href: `#/accounts?id=${Number(a.id)}` }, h("strong", a.name)) },
      { label: "Balance", cls: "num", cell: (a) => credits(a.balance) },
      { label: "Reserved", cls: "num", cell: (a) => credits(a.reserved) },
      { label: "Keys", cls: "num", cell: (a) => int(a.keys) },
      { label: "Limits (all keys)", cell: limitsText },
      { label: "State", cell: accountState },
      { label: "", cls: "actions", cell: actions },
    ], rows, { empty: "No accounts yet: create one with New account.",
      rowAttrs: (a) => ({ dataset: { account: a.name, id: String(a.id) } }) }));
  }

  await reload();
  return undefined;
}
