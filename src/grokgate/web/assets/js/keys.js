// What the Tokens page and an account's page share about keys: their limit fields, how a key's limits, state
// and spending limit read, and the one-time display of a new secret.

import { clear, h } from "./dom.js";
import { credits, date, dateTime, int } from "./format.js";
import { copyText, field, pill, toast } from "./ui.js";

const DAY = 86_400;

/** "2026-01-31" -> the end of that UTC day in Unix seconds: the token works through the whole date. */
function expiryFromDate(text) {
  if (!text) return null;
  return Math.floor(Date.parse(`${text}T00:00:00Z`) / 1000) + DAY - 1;
}

const positive = (text) => (text === "" ? null : Number(text));

export function limitsText(k) {
  const parts = [];
  if (k.rpm) parts.push(`${int(k.rpm)} rpm`);
  if (k.tpm) parts.push(`${int(k.tpm)} tpm`);
  if (k.max_concurrency) parts.push(`${int(k.max_concurrency)} at once`);
  return parts.join(" · ") || "none";
}

export function state(k) {
  if (k.disabled) return pill("disabled", "bad");
  if (k.expires_at && k.expires_at * 1000 < Date.now()) return pill("expired", "warn");
  return pill("active", "ok");
}

/** The fields shared by "create" and "edit". */
export function limitFields(models, k = {}) {
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

export function limitValues(v) {
  return {
    rpm: positive(v.rpm),
    tpm: positive(v.tpm),
    max_concurrency: positive(v.max_concurrency),
    expires_at: expiryFromDate(v.expires),
    allowed_models: v.allowed_models && v.allowed_models.length ? v.allowed_models : null,
  };
}

export const PERIODS = [
  { value: "", label: "Never resets" },
  { value: "daily", label: "Daily (UTC days)" },
  { value: "weekly", label: "Weekly (from Monday, UTC)" },
  { value: "monthly", label: "Monthly (UTC)" },
];

const PER = { daily: "per day", weekly: "per week", monthly: "per month" };

/** A key's spending limit and its reset period as fields (credits as typed: the API parses them exactly). */
export function spendFields(spend = {}) {
  return [
    field({ name: "spend_limit", label: "Spending limit (credits)", placeholder: "e.g. 5 or 0.25",
      value: spend.limit_credits ?? "", hint: "Empty: only the account's balance bounds this key" }),
    field({ name: "period", label: "Limit resets", type: "select", value: spend.period || "", options: PERIODS }),
  ];
}

export function spendValues(v) {
  return { spend_limit: v.spend_limit === "" ? null : v.spend_limit, period: v.period || null };
}

/** "5 per day", "2.5 (never resets)", or "none". */
export function limitText(spend) {
  if (!spend || spend.limit === null || spend.limit === undefined) return "none";
  return `${credits(spend.limit)} ${spend.period ? PER[spend.period] : "(never resets)"}`;
}

/** This period's spend, with a bar of how much of the limit it used when there is one. */
export function spentCell(spend) {
  const spent = h("span.spent", credits(spend.spent));
  if (spend.limit === null || spend.limit === undefined) return spent;
  const used = Number(spend.limit) > 0 ? Math.min(1, Number(spend.spent + spend.reserved) / Number(spend.limit)) : 1;
  const bar = h("span.meter-bar", { class: used >= 1 ? "meter-bar meter-full" : "meter-bar" });
  bar.style.width = `${Math.round(used * 100)}%`; // CSSOM, allowed by the page's style-src policy
  return h("span.spend", spent, h("span.muted", ` of ${credits(spend.limit)}`), h("span.meter", bar));
}

export function resetText(spend) {
  if (!spend || spend.resets_at === null || spend.resets_at === undefined) return "never";
  return `${dateTime(spend.resets_at)} UTC`;
}

/** The secret exists only in the create (or rotate) answer: show it once, with a way to copy it, until dismissed. */
export function showSecret(slot, created, heading = `Secret of ${created.key.name}`) {
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
  const done = h("button.btn.btn-quiet", { type: "button", dataset: { action: "secret-done" },
    onclick: () => clear(slot) }, "Done");
  clear(slot, h("div.notice.notice-secret", { role: "region", "aria-label": "New token secret" },
    h("p", h("strong", heading), " — copy it now: it is not shown again."),
    h("div.secret-row", code, copy, done)));
}
