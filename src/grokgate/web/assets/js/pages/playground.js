// Playground: one streamed answer, through either API (chat completions, or the Responses API's /v1/responses),
// its text shown as it arrives (per choice), then its usage and cost. The admin token is not charged, so its cost
// is computed from the model's current price; for an account token the console shows what actually left the
// balance.

import { ApiError, errorFrom } from "../api.js";
import { clear, formValues, h } from "../dom.js";
import { credits, int, signedCredits } from "../format.js";
import { field, message, pageHeader, toast } from "../ui.js";
import { sseData } from "../sse.js";

const PER_MILLION = 1_000_000n;
const ceilDiv = (a, b) => (a + b - 1n) / b;

/** The gateway's own pricing arithmetic (core/pricing.py): per class, rounded up to the micro-credit. */
export function costOf(usage, price) {
  const prompt = BigInt(usage.prompt_tokens || 0);
  const cachedRaw = BigInt((usage.prompt_tokens_details || {}).cached_tokens || 0);
  const cached = cachedRaw < prompt ? cachedRaw : prompt;
  const completion = BigInt(usage.completion_tokens || 0);
  return ceilDiv((prompt - cached) * BigInt(price.input), PER_MILLION) +
    ceilDiv(cached * BigInt(price.cached_input), PER_MILLION) +
    ceilDiv(completion * BigInt(price.output), PER_MILLION);
}

/** A Responses API usage in the chat shape the rest of the page reads (costOf, the summary). */
export function chatUsage(usage) {
  return {
    prompt_tokens: usage.input_tokens || 0,
    completion_tokens: usage.output_tokens || 0,
    total_tokens: usage.total_tokens || 0,
    prompt_tokens_details: { cached_tokens: (usage.input_tokens_details || {}).cached_tokens || 0 },
  };
}

const APIS = [
  { value: "chat", label: "Chat completions", path: "/grok/chat/completions" },
  { value: "responses", label: "Responses", path: "/v1/responses" },
];

/** Check the numbers before sending, so a typo gets a sentence rather than a round trip. */
function requestBody(v) {
  const temperature = Number(v.temperature);
  const maxTokens = Number(v.max_tokens);
  const n = v.api === "responses" ? 1 : Number(v.n); // the Responses API answers one choice
  if (!v.prompt) throw new ApiError("Write a message to send.");
  if (!(temperature >= 0 && temperature <= 2)) throw new ApiError("Temperature is a number from 0 to 2.");
  if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) throw new ApiError("Max tokens is a whole number, 1 or more.");
  if (!(Number.isInteger(n) && n >= 1 && n <= 16)) throw new ApiError("Choices (n) is a whole number from 1 to 16.");
  if (v.api === "responses") {
    const body = { model: v.model, input: v.prompt, temperature, max_output_tokens: maxTokens, stream: true };
    if (v.system) body.instructions = v.system;
    return body;
  }
  const messages = [];
  if (v.system) messages.push({ role: "system", content: v.system });
  messages.push({ role: "user", content: v.prompt });
  return { model: v.model, messages, temperature, max_tokens: maxTokens, n, stream: true,
    stream_options: { include_usage: true } };
}

export async function render(root, ctx) {
  const admin = ctx.session.role === "admin";
  const models = await ctx.api.get("/v1/models");
  const send = h("button#pg-send.btn.btn-primary", { type: "submit" }, "Send");
  const stop = h("button#pg-stop.btn", { type: "button", disabled: true }, "Stop");
  const status = h("p#pg-status.status-line", { dataset: { state: "idle" }, role: "status" },
    "Ready. The answer streams in below as it is generated.");
  const outputs = h("div#pg-outputs.outputs");
  const summary = h("div#pg-summary.summary", { hidden: true });
  const form = h("form.playground-form",
    field({ name: "model", label: "Model", type: "select", value: models.data[0] ? models.data[0].id : "",
      options: models.data.map((m) => ({ value: m.id, label: m.id })) }),
    field({ name: "api", label: "API", type: "select", value: "chat", options: APIS,
      hint: "Responses: POST /v1/responses with `input`; one choice, its output_text shown as it streams." }),
    field({ name: "system", label: "System prompt (optional)", type: "textarea", rows: 2,
      placeholder: "e.g. You are a terse assistant." }),
    field({ name: "prompt", label: "Message", type: "textarea", rows: 4, required: true,
      placeholder: "Ask something…" }),
    h("div.field-row",
      field({ name: "temperature", label: "Temperature", type: "number", min: 0, max: 2, step: 0.1, value: "0.7" }),
      field({ name: "max_tokens", label: "Max tokens", type: "number", min: 1, step: 1, value: "64" }),
      field({ name: "n", label: "Choices (n)", type: "number", min: 1, max: 16, step: 1, value: "1" })),
    h("div.form-actions", send, stop));
  root.append(pageHeader("Playground"), h("div.playground", form, h("div.playground-out", status, outputs, summary)));
  // The Responses API has no `n`: its field is off while that API is chosen.
  const apiSelect = form.querySelector("select[name=api]");
  const nInput = form.querySelector("input[name=n]");
  const syncApi = () => { nInput.disabled = apiSelect.value === "responses"; };
  apiSelect.addEventListener("change", syncApi);
  syncApi();

  let controller = null;
  const setStatus = (state, text) => {
    status.dataset.state = state;
    status.textContent = text;
  };

  stop.addEventListener("click", () => controller && controller.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) return;
    let body;
    const values = formValues(form);
    const api = APIS.find((a) => a.value === values.api) || APIS[0];
    try {
      body = requestBody(values);
    } catch (error) {
      setStatus("error", message(error));
      return;
    }
    controller = new AbortController();
    send.disabled = true;
    send.setAttribute("aria-busy", "true");
    send.textContent = "Generating…";
    stop.disabled = false;
    summary.hidden = true;
    clear(summary);

    const texts = [];
    const finishes = [];
    const choices = body.n || 1;
    clear(outputs, ...Array.from({ length: choices }, (_, i) => {
      texts[i] = h("pre.output", { dataset: { choice: String(i) }, "aria-live": i === 0 ? "polite" : "off" });
      finishes[i] = h("span.finish");
      return h("section.choice", h("h3", choices > 1 ? `Choice ${i + 1}` : "Answer", finishes[i]), texts[i]);
    }));

    const started = performance.now();
    let before = null;
    let usage = null;
    try {
      // What to compare the answer's cost with: the price (admin, not charged) or the balance (account token).
      const reference = admin ? ctx.api.get("/admin/prices") : ctx.refreshAccount();
      before = await reference;
      setStatus("waiting", "Waiting for the first token…");
      const response = await ctx.api.fetch(api.path,
        { method: "POST", body, signal: controller.signal, accept: "text/event-stream" });
      if (!response.ok) throw await errorFrom(response);
      setStatus("streaming", "Streaming…");
      const read = api.value === "responses" ? readResponses : readChat;
      const result = await read(sseData(response.body), texts, finishes);
      usage = result.usage;
      if (!result.done) throw new ApiError("The connection closed before the answer was complete.");
      const seconds = (performance.now() - started) / 1000;
      setStatus("done", `Done in ${seconds.toFixed(1)} s.`);
      await showSummary(usage, body.model, before, seconds);
      toast("Answer complete.");
    } catch (error) {
      const stopped = error && error.name === "AbortError";
      setStatus(stopped ? "stopped" : "error", stopped ? "Stopped. You are billed for what was generated." :
        message(error));
      if (!stopped) toast(message(error), "error");
      if (!admin) ctx.refreshAccount().catch(() => {});
    } finally {
      controller = null;
      send.disabled = false;
      send.removeAttribute("aria-busy");
      send.textContent = "Send";
      stop.disabled = true;
    }
  });

  // Leaving the page stops a running answer (the gateway then bills only what was generated).
  const leave = () => controller && controller.abort();

  async function showSummary(u, model, before, seconds) {
    const lines = [];
    if (u) {
      const perSecond = seconds > 0 ? ` · ${(u.completion_tokens / seconds).toFixed(1)} tokens/s` : "";
      lines.push(h("p", h("strong", "Usage: "),
        `${int(u.prompt_tokens)} prompt + ${int(u.completion_tokens)} completion = ${int(u.total_tokens)} tokens`,
        perSecond));
    }
    if (admin) {
      const price = before.current.find((p) => p.model === model);
      if (u && price) {
        lines.push(h("p#pg-cost", h("strong", "Cost: "), `${credits(costOf(u, price))} credits`,
          h("span.muted", ` at price v${price.version} (the admin token is not charged)`)));
      } else {
        lines.push(h("p#pg-cost.muted", "No price is set for this model, so the request cost nothing."));
      }
    } else {
      const after = await ctx.refreshAccount();
      const change = BigInt(after.balance) - BigInt(before.balance);
      lines.push(h("p#pg-cost", h("strong", "Balance: "), `${credits(before.balance)} → ${credits(after.balance)}`,
        ` credits (${signedCredits(change)})`));
    }
    clear(summary, ...lines);
    summary.hidden = false;
  }

  return leave;
}

/** A chat completions stream: chunks per choice, then `[DONE]`. */
async function readChat(events, texts, finishes) {
  let usage = null;
  for await (const data of events) {
    if (data === "[DONE]") return { done: true, usage };
    const chunk = parse(data);
    if (!chunk) continue;
    // After the 200 an error arrives as an event; its message is for the person.
    if (chunk.error) throw new ApiError(chunk.error.message || "The answer stopped with an error.");
    for (const choice of chunk.choices || []) {
      const out = texts[choice.index];
      if (!out) continue;
      const delta = choice.delta || {};
      if (delta.content) out.append(delta.content); // a text node per piece: no re-layout of the whole text
      if (choice.finish_reason) finishes[choice.index].textContent = ` · ${choice.finish_reason}`;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  return { done: false, usage };
}

/** A Responses API stream: typed events; the output text arrives as `response.output_text.delta`, and the
 * stream ends with `response.completed`, `response.incomplete` or `response.failed` (no `[DONE]`). */
async function readResponses(events, texts, finishes) {
  for await (const data of events) {
    const event = parse(data);
    if (!event) continue;
    if (event.error && !event.type) throw new ApiError(event.error.message || "The answer stopped with an error.");
    switch (event.type) {
      case "response.output_text.delta":
        if (event.delta) texts[0].append(event.delta);
        break;
      case "response.completed":
      case "response.incomplete": {
        const r = event.response || {};
        const reason = r.status === "incomplete" ? (r.incomplete_details || {}).reason || "incomplete" : r.status;
        if (reason) finishes[0].textContent = ` · ${reason}`;
        return { done: true, usage: r.usage ? chatUsage(r.usage) : null };
      }
      case "response.failed": {
        const failure = (event.response || {}).error || {};
        throw new ApiError(failure.message || "The answer stopped with an error.");
      }
      case "error":
        throw new ApiError(event.message || (event.error || {}).message || "The answer stopped with an error.");
      default:
        break; // created, in_progress, output_item.*, content_part.*: nothing new to show
    }
  }
  return { done: false, usage: null };
}

function parse(data) {
  try {
    return JSON.parse(data);
  } catch {
    return null; // not JSON: nothing a person needs to see
  }
}
