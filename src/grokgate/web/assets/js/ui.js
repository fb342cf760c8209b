// Shared feedback: toasts, busy buttons, dialogs, copy to clipboard, and tables that read well on a phone.

import { ApiError } from "./api.js";
import { clear, formValues, h } from "./dom.js";

/** A short message in the corner; errors stay longer because they usually need reading. */
export function toast(message, kind = "ok") {
  const box = document.getElementById("toasts");
  const item = h("div.toast", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  box.append(item);
  // Keep at most three on screen: a burst of actions should not bury the page.
  while (box.children.length > 3) box.firstElementChild.remove();
  setTimeout(() => item.classList.add("toast-out"), kind === "error" ? 7000 : 3500);
  setTimeout(() => item.remove(), kind === "error" ? 7400 : 3900);
  return item;
}

/** Words for any failure; ApiError already carries the API's own message. */
export function message(error) {
  if (error instanceof ApiError) return error.message;
  if (error && error.name === "AbortError") return "Stopped.";
  return "Something went wrong in the console. Reload the page and try again.";
}

export function toastError(error) {
  return toast(message(error), "error");
}

/**
 * Run `work` with `button` showing that it is busy (disabled, aria-busy, a label such as "Saving…"), so a
 * double click cannot send the same action twice. Errors become a toast unless `rethrow` is set.
 */
export async function busy(button, label, work, { rethrow = false } = {}) {
  const original = button ? button.textContent : "";
  if (button) {
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    button.textContent = label;
  }
  try {
    return await work();
  } catch (error) {
    if (rethrow) throw error;
    toastError(error);
    return undefined;
  } finally {
    if (button) {
      button.disabled = false;
      button.removeAttribute("aria-busy");
      button.textContent = original;
    }
  }
}

/** An inline error in words (for a whole page or panel that could not load). */
export function errorBox(error, retry) {
  return h("div.notice.notice-error", { role: "alert" },
    h("p", message(error)),
    retry ? h("button.btn", { type: "button", onclick: retry }, "Try again") : null);
}

export function pageHeader(title, ...actions) {
  return h("div.page-head", h("h1", title), h("div.page-actions", ...actions));
}

/**
 * A modal form of `fields` (nodes made by field() below). Resolves with what
 * `onSubmit` returned, or null when cancelled; while `onSubmit` runs the submit button is busy, and its error is
 * shown inside the dialog so the person can correct the input.
 */
export function formDialog({ title, fields, submitLabel = "Save", busyLabel = "Saving…", danger = false, text,
  onSubmit }) {
  return new Promise((resolve) => {
    const errorLine = h("p.form-error", { role: "alert", hidden: true });
    const submit = h("button.btn", { type: "submit", class: danger ? "btn btn-danger" : "btn btn-primary" },
      submitLabel);
    const cancel = h("button.btn.btn-quiet", { type: "button" }, "Cancel");
    const form = h("form.dialog-form", { method: "dialog", novalidate: true },
      h("h2", title),
      text ? h("p", text) : null,
      fields || [],
      errorLine,
      h("div.dialog-actions", cancel, submit));
    const dialog = h("dialog.dialog", { "aria-label": title }, form);
    let result = null;
    let working = false;
    cancel.addEventListener("click", () => dialog.close());
    // Escape must not hide a dialog whose action is still running: its outcome would go unseen.
    dialog.addEventListener("cancel", (event) => {
      if (working) event.preventDefault();
    });
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(result);
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      errorLine.hidden = true;
      if (!form.reportValidity()) return;
      working = true;
      cancel.disabled = true;
      try {
        result = await busy(submit, busyLabel, () => onSubmit(formValues(form)), { rethrow: true });
        if (result === undefined || result === null) result = true;
        working = false;
        dialog.close();
      } catch (error) {
        errorLine.textContent = message(error);
        errorLine.hidden = false;
      } finally {
        working = false;
        cancel.disabled = false;
      }
    });
    document.body.append(dialog);
    dialog.showModal();
    const first = form.querySelector("input, textarea, select");
    (first || submit).focus();
  });
}

/** Ask before something that cannot be undone. */
export function confirmDialog(title, text, confirmLabel, action) {
  return formDialog({ title, text, submitLabel: confirmLabel, busyLabel: "Working…", danger: true,
    onSubmit: action });
}

/** One labelled control. */
export function field({ name, label, type = "text", value = "", hint, required, min, max, step, options,
  placeholder, rows, autocomplete = "off" }) {
  const id = `f-${name}-${Math.random().toString(36).slice(2, 8)}`;
  let control;
  if (type === "select") {
    control = h("select", { id, name, value },
      options.map((o) => h("option", { value: o.value, selected: String(o.value) === String(value) }, o.label)));
  } else if (type === "textarea") {
    control = h("textarea", { id, name, rows: rows || 3, placeholder, required, value });
  } else if (type === "checkboxes") {
    const chosen = new Set(value || []);
    control = h("div.checks", { id, role: "group" },
      options.map((o) => h("label.check", h("input", { type: "checkbox", name, value: o.value,
        checked: chosen.has(o.value) }), o.label)));
  } else {
    control = h("input", { id, name, type, value, required, min, max, step, placeholder, autocomplete });
  }
  return h("div.field", { class: type === "checkboxes" ? "field field-wide" : "field" },
    h("label", { for: id }, label),
    control,
    hint ? h("small.hint", hint) : null);
}

/**
 * Copy text to the clipboard: the async Clipboard API where the page may use it, else a hidden textarea and
 * execCommand (older browsers, or a console opened over plain http from another host). Returns whether it
 * worked; the caller tells the person to copy by hand when it did not.
 */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // permission refused: try the old way
    }
  }
  const area = h("textarea.offscreen", { readonly: true, "aria-hidden": "true" });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

/**
 * A table whose cells carry their column's name, so the stylesheet can lay each row out as a small card on a
 * phone instead of a table wider than the screen. `columns`: [{label, cell(row) -> Node|string, cls}].
 */
export function table(columns, rows, { empty = "Nothing to show.", rowAttrs } = {}) {
  if (!rows.length) return h("p.empty", empty);
  return h("div.table-wrap",
    h("table.data",
      h("thead", h("tr", columns.map((c) => h("th", { scope: "col", class: c.cls }, c.label)))),
      h("tbody", rows.map((row) => h("tr", rowAttrs ? rowAttrs(row) : {}, columns.map((c) => {
        const value = c.cell(row);
        const blank = value === "" || value === null || value === undefined;
        return h("td", { "data-label": c.label, class: [c.cls, blank && "blank"] }, value);
      }))))));
}

/** Replace a panel's content with a "Loading…" line while its data comes. */
export function loading(node, text = "Loading…") {
  clear(node, h("p.loading", text));
}

/** A coloured pill for a status word. */
export function pill(text, kind) {
  return h("span.pill", { class: `pill pill-${kind}` }, text);
}

/** Offer text as a file download without putting anything in a URL the server sees. */
export function download(filename, text, type = "text/csv") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = h("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
