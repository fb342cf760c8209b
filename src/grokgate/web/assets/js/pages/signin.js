// Sign-in: paste a token. Whether it is the admin token or an account token is found out by asking an admin
// endpoint (403 `forbidden` means an account token), so there is nothing to choose.

import { h } from "../dom.js";
import { busy, message } from "../ui.js";

export function render(root, { error, submit }) {
  const input = h("input#token", { type: "password", name: "token", required: true, autocomplete: "off",
    spellcheck: false, placeholder: "gg-…", "aria-describedby": "token-help" });
  const errorLine = h("p.form-error", { role: "alert", hidden: !error }, error || "");
  const button = h("button.btn.btn-primary", { type: "submit" }, "Sign in");
  const form = h("form.signin-form", {
    onsubmit: async (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) {
        errorLine.textContent = "Paste a token first.";
        errorLine.hidden = false;
        return;
      }
      errorLine.hidden = true;
      try {
        await busy(button, "Checking…", () => submit(token), { rethrow: true });
      } catch (exc) {
        errorLine.textContent = message(exc);
        errorLine.hidden = false;
        input.select();
      }
    },
  },
  h("h1", "Sign in to grokgate"),
  h("label", { for: "token" }, "Token"),
  input,
  h("small#token-help.hint",
    "The admin token (GROKGATE_API_KEYS) sees everything; an account token sees its own balance and usage. ",
    "It stays in this tab only and is forgotten when the tab closes."),
  errorLine,
  button);
  root.append(h("div.signin", form));
  input.focus();
}
