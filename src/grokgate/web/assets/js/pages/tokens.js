// Tokens (admin only): list, create (the secret is shown once, with a Copy button), enable/disable, top up,
// edit limits and models, delete.

import { clear, h } from "../dom.js";
import { credits, date } from "../format.js";
import { limitFields, limitsText, limitValues, showSecret, state } from "../keys.js";
import { busy, confirmDialog, errorBox, field, formDialog, loading, pageHeader, table, toast } from "../ui.js";

export async function render(root, ctx) {
  const { api } = ctx;
  const secretBox = h("div.secret-slot");
  const list = h("div.token-list");
  const newButton = h("button.btn.btn-primary", { type: "button" }, "New token");
  root.append(pageHeader("Tokens", newButton), secretBox, list);
  loading(list);

  const [keys, models] = await Promise.all([api.get("/admin/keys"), api.get("/v1/models")]);
  const modelIds = models.data.map((m) => m.id);

  async function reload() {
    const fresh = await api.get("/admin/keys");
    ctx.session.keys = fresh.data;
    draw(fresh.data);
  }

  newButton.addEventListener("click", async () => {
    const created = await formDialog({
      title: "New token",
      submitLabel: "Create token",
      busyLabel: "Creating…",
      fields: [
        field({ name: "name", label: "Name", required: true, placeholder: "e.g. alice" }),
        field({ name: "credits", label: "Initial credits", type: "text", placeholder: "e.g. 10 or 0.5",
          hint: "Empty: 0" }),
        ...limitFields(modelIds),
      ],
      onSubmit: (v) => {
        const body = { name: v.name, ...limitValues(v) };
        if (v.credits) body.credits = v.credits;
        for (const key of Object.keys(body)) if (body[key] === null) delete body[key];
        return api.post("/admin/keys", body);
      },
    });
    if (!created) return;
    showSecret(secretBox, created);
    toast(`Token ${created.key.name} created.`);
    await reload().catch((e) => clear(list, errorBox(e, reload)));
  });

  function actions(k) {
    const topUp = h("button.btn.btn-small", { type: "button", dataset: { action: "topup" } }, "Top up");
    topUp.addEventListener("click", async () => {
      const updated = await formDialog({
        title: `Top up ${k.name}`,
        submitLabel: "Add credits",
        busyLabel: "Adding…",
        fields: [
          field({ name: "amount", label: "Credits to add", required: true, placeholder: "e.g. 5" }),
          field({ name: "note", label: "Note (optional)", placeholder: "e.g. invoice 42" }),
        ],
        onSubmit: (v) => api.post(`/admin/keys/${k.id}/credits`, { amount: v.amount, note: v.note || null }),
      });
      if (!updated) return;
      toast(`${k.name} now has ${credits(updated.balance)} credits.`);
      await reload().catch((e) => toast(e.message, "error"));
    });

    const edit = h("button.btn.btn-small", { type: "button", dataset: { action: "edit" } }, "Edit");
    edit.addEventListener("click", async () => {
      const updated = await formDialog({
        title: `Edit ${k.name}`,
        fields: [field({ name: "name", label: "Name", required: true, value: k.name }), ...limitFields(modelIds, k)],
        onSubmit: (v) => api.patch(`/admin/keys/${k.id}`, { name: v.name, ...limitValues(v) }),
      });
      if (!updated) return;
      toast(`${updated.name} saved.`);
      await reload().catch((e) => toast(e.message, "error"));
    });

    const toggle = h("button.btn.btn-small", { type: "button", dataset: { action: k.disabled ? "enable" : "disable" } },
      k.disabled ? "Enable" : "Disable");
    toggle.addEventListener("click", () => busy(toggle, k.disabled ? "Enabling…" : "Disabling…", async () => {
      await api.patch(`/admin/keys/${k.id}`, { disabled: !k.disabled });
      toast(`${k.name} ${k.disabled ? "enabled" : "disabled"}.`);
      await reload();
    }));

    const remove = h("button.btn.btn-small.btn-danger-quiet", { type: "button", dataset: { action: "delete" } },
      "Delete");
    remove.addEventListener("click", async () => {
      const gone = await confirmDialog(`Delete ${k.name}?`,
        "Requests with this token stop at once. Its ledger rows stay for the record. This cannot be undone.",
        "Delete token", () => api.delete(`/admin/keys/${k.id}`));
      if (!gone) return;
      toast(`${k.name} deleted.`);
      await reload().catch((e) => toast(e.message, "error"));
    });
    return h("div.row-actions", topUp, edit, toggle, remove);
  }

  function draw(rows) {
    clear(list, table([
      { label: "Name", cell: (k) => h("strong", k.name) },
      { label: "Prefix", cell: (k) => h("code", k.prefix) },
      // The balance is the account's, shared by all its keys: say whose it is, and lead to it.
      { label: "Account", cell: (k) => h("a", { href: `#/accounts?id=${Number(k.account_id)}` }, k.account_name) },
      { label: "Balance", cls: "num", cell: (k) => `${credits(k.balance)}` },
      { label: "Reserved", cls: "num", cell: (k) => credits(k.reserved) },
      { label: "Limits", cell: limitsText },
      { label: "Models", cell: (k) => (k.allowed_models ? k.allowed_models.join(", ") : "all") },
      { label: "Expires", cell: (k) => date(k.expires_at) || "never" },
      { label: "State", cell: state },
      { label: "", cls: "actions", cell: actions },
    ], rows, { empty: "No tokens yet: create one with New token.",
      rowAttrs: (k) => ({ dataset: { token: k.name, id: String(k.id) } }) }));
  }

  draw(keys.data);
}
