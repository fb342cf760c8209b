// Tokens (admin only): list, create (the secret is shown once, with a Copy button), enable/disable, top up,
// edit limits and models, delete.

import { clear, h } from "../dom.js";
import { credits, date, int } from "../format.js";
import { busy, confirmDialog, copyText, errorBox, field, formDialog, loading, pageHeader, pill, table, toast }
  from "../ui.js";

const DAY = 86_400;

/** "2026-01-31" -> the end of that UTC day in Unix seconds: the token works through the whole date. */
function expiryFromDate(text) {
  if (!text) return null;
  return Math.floor(Date.parse(`${text}T00:00:00Z`) / 1000) + DAY - 1;
}

const positive = (text) => (text === "" ? null : Number(text));

function limitsText(k) {
  const parts = [];
  if (k.rpm) parts.push(`${int(k.rpm)} rpm`);
  if (k.tpm) parts.push(`${int(k.tpm)} tpm`);
  if (k.max_concurrency) parts.push(`${int(k.max_concurrency)} at once`);
  return parts.join(" · ") || "none";
}

function state(k) {
  if (k.disabled) return pill("disabled", "bad");
  if (k.expires_at && k.expires_at * 1000 < Date.now()) return pill("expired", "warn");
  return pill("active", "ok");
}

/** The fields shared by "create" and "edit". */
function limitFields(models, k = {}) {
  return [
    field({ name: "rpm", label: "Requests per minute", type: "number", min: 1, step: 1, value: k.rpm ?? "",
      hint: "Empty: no limit" }),
    field({ name: "tpm", label: "Tokens per minute", type: "number", min: 1, step: 1, value: k.tpm ?? "",
      hint: "Empty: no limit" }),
    field({ name: "max_concurrency", label: "Requests at once", type: "number", min: 1, step: 1,
      value: k.max_concurrency ?? "", hint: "Empty: no limit" }),
    field({ name: "expires", label: "Expires after (UTC date)", type: "date", value: date(k.expires_at),
      hint: "Empty: never" }),
    field({ name: "allowed_models", label: "Allowed models (none ticked: every model)", type: "checkboxes",
      value: k.allowed_models || [],
      // Keep models the token already allows even when no route serves them now, so saving does not drop them.
      options: [...new Set([...models, ...(k.allowed_models || [])])].map((m) => ({ value: m, label: m })) }),
  ];
}

function limitValues(v) {
  return {
    rpm: positive(v.rpm),
    tpm: positive(v.tpm),
    max_concurrency: positive(v.max_concurrency),
    expires_at: expiryFromDate(v.expires),
    allowed_models: v.allowed_models && v.allowed_models.length ? v.allowed_models : null,
  };
}

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
    showSecret(created);
    toast(`Token ${created.key.name} created.`);
    await reload().catch((e) => clear(list, errorBox(e, reload)));
  });

  /** The secret exists only in the create answer: show it once, with a way to copy it, until dismissed. */
  function showSecret(created) {
    const code = h("code#new-secret.secret", created.token);
    const copy = h("button.btn.btn-primary", { type: "button", dataset: { action: "copy-secret" } }, "Copy");
    copy.addEventListener("click", async () => {
      if (await copyText(created.token)) {
        toast("Secret copied to the clipboard.");
        copy.textContent = "Copied";
      } else {
        // Select it so one Ctrl+C / long-press does it by hand.
        getSelection().selectAllChildren(code);
        toast("Copying is blocked here: the secret is selected, copy it by hand.", "warn");
      }
    });
    const done = h("button.btn.btn-quiet", { type: "button", onclick: () => clear(secretBox) }, "Done");
    clear(secretBox, h("div.notice.notice-secret", { role: "region", "aria-label": "New token secret" },
      h("p", h("strong", `Secret of ${created.key.name}`), " — copy it now: it is not shown again."),
      h("div.secret-row", code, copy, done)));
  }

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
