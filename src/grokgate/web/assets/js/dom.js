// A tiny element builder. Everything user- or API-provided goes in as text nodes (never innerHTML), so a token
// name or model id can never inject markup into a page that holds a bearer token.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  append(node, children); // children first: a <select>'s value can only be set once its options exist
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "dataset") {
      Object.assign(node.dataset, value);
    } else if (key === "class") {
      node.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    } else if (value === true) {
      node.setAttribute(key, "");
    } else if (key in node && !(node instanceof SVGElement) && key !== "list" && key !== "form") {
      node[key] = value; // properties such as value, checked, disabled
    } else {
      node.setAttribute(key, String(value));
    }
  }
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** h("button#save.btn.primary", {onclick}, "Save") -> <button id="save" class="btn primary">Save</button> */
export function h(tag, attrs, ...children) {
  if (attrs instanceof Node || typeof attrs !== "object" || attrs === null || Array.isArray(attrs)) {
    children.unshift(attrs);
    attrs = {};
  }
  // "tag#id.class.class": the id and classes written in the tag name, as in CSS.
  const [head, ...classes] = tag.split(".");
  const [name, id] = head.split("#");
  const node = document.createElement(name || "div");
  if (id) node.id = id;
  if (classes.length) node.className = classes.join(" ");
  return build(node, attrs, children);
}

/** The same for SVG elements (charts). */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Empty a node, then put `children` in it (null/false children are skipped, as in h()). */
export function clear(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** The value of each named control of a form, as trimmed strings ("" when empty). */
export function formValues(form) {
  const values = {};
  for (const el of form.elements) {
    if (!el.name) continue;
    if (el.type === "checkbox") {
      if (!values[el.name]) values[el.name] = [];
      if (el.checked) values[el.name].push(el.value);
    } else {
      values[el.name] = el.value.trim();
    }
  }
  return values;
}
