// Models & prices: the routing table (which backends serve each public name, in which order) and the price
// of each model with its versions. Prices are per million tokens, shown in credits; admins can set new ones.

import { clear, h } from "../dom.js";
import { credits, dateTime } from "../format.js";
import { field, formDialog, pageHeader, pill, table, toast } from "../ui.js";

const perMillion = (micro) => credits(micro);

function routes(model) {
  return h("ol.routes", model.routes.map((r) => h("li",
    h("span.route-backend", r.backend), ` (${r.kind}) → `, h("code", r.model),
    r.priority ? h("span.muted", ` · priority ${r.priority}`) : null,
    r.weight !== 1 ? h("span.muted", ` · weight ${r.weight}`) : null,
    " ", r.ready ? pill("ready", "ok") : pill("not ready", "bad"))));
}

function priceText(p) {
  if (!p) return h("span.muted", "no price");
  return h("span", `${perMillion(p.input)} / ${perMillion(p.cached_input)} / ${perMillion(p.output)}`);
}

export async function render(root, ctx) {
  if (ctx.session.role !== "admin") return renderForHolder(root, ctx);
  const body = h("div");
  root.append(pageHeader("Models & prices"), h("p.sub",
    "Prices are credits per million tokens: input / cached input / output (reasoning counts as output). ",
    "Setting a price adds a version; requests already running keep the price they started with."), body);

  async function draw() {
    const [models, prices] = await Promise.all([ctx.api.get("/admin/models"), ctx.api.get("/admin/prices")]);
    const history = new Map();
    for (const p of prices.history) {
      if (!history.has(p.model)) history.set(p.model, []);
      history.get(p.model).push(p);
    }
    const detail = h("div.history-slot");
    clear(body, table([
      { label: "Model", cell: (m) => h("strong", m.id) },
      { label: "Routes (in order)", cell: routes },
      { label: "Price in / cached / out", cls: "num", cell: (m) => priceText(m.price) },
      { label: "Version", cls: "num", cell: (m) => (m.price ? `v${m.price.version}` : "") },
      { label: "", cls: "actions", cell: (m) => h("div.row-actions",
        h("button.btn.btn-small", { type: "button", dataset: { action: "set-price" },
          onclick: () => editPrice(m) }, "Set price"),
        h("button.btn.btn-small.btn-quiet", { type: "button", dataset: { action: "history" },
          onclick: () => showHistory(detail, m.id, history.get(m.id) || []) },
        `History (${(history.get(m.id) || []).length})`)) },
    ], models.data, { empty: "No models are configured.", rowAttrs: (m) => ({ dataset: { model: m.id } }) }),
    detail);
  }

  async function editPrice(m) {
    const p = m.price || { input: 0, cached_input: 0, output: 0 };
    const saved = await formDialog({
      title: `Price of ${m.id}`,
      text: "Credits per million tokens.",
      fields: [
        field({ name: "input", label: "Input", required: true, value: credits(p.input) }),
        field({ name: "cached_input", label: "Cached input", required: true,
          value: credits(p.cached_input) }),
        field({ name: "output", label: "Output", required: true, value: credits(p.output) }),
      ],
      onSubmit: (v) => ctx.api.put(`/admin/prices/${encodeURIComponent(m.id)}`, v),
    });
    if (!saved) return;
    toast(`${m.id} now costs ${perMillion(saved.input)} / ${perMillion(saved.cached_input)} / ` +
      `${perMillion(saved.output)} (version ${saved.version}).`);
    await draw();
  }

  await draw();
}

function showHistory(slot, model, versions) {
  clear(slot, h("section.panel",
    h("div.page-head", h("h2", `Price history of ${model}`),
      h("button.btn.btn-quiet", { type: "button", onclick: () => clear(slot) }, "Close")),
    table([
      { label: "Version", cls: "num", cell: (p) => `v${p.version}` },
      { label: "Input", cls: "num", cell: (p) => perMillion(p.input) },
      { label: "Cached input", cls: "num", cell: (p) => perMillion(p.cached_input) },
      { label: "Output", cls: "num", cell: (p) => perMillion(p.output) },
    ], [...versions].reverse(), { empty: "No price was ever set." })));
  slot.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

/** A key holder sees the model names it can call; routes and prices are the operator's business. */
async function renderForHolder(root, ctx) {
  const models = await ctx.api.get("/v1/models");
  root.append(pageHeader("Models"),
    h("p.sub", "The models this gateway serves. Your admin sets which ones your token may use and their prices."),
    table([
      { label: "Model", cell: (m) => h("code", m.id) },
      { label: "Serves since", cell: (m) => dateTime(m.created) },
    ], models.data, { empty: "No models are configured." }));
}
