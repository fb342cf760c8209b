// The console shell: sign-in state, the nav bar, and a router over the URL fragment (#/usage?status=!ok), so
// the server needs a single route and no page state ever goes to the server in a URL.

import { Api, identify } from "./api.js";
import { clear, h } from "./dom.js";
import { credits } from "./format.js";
import { errorBox, message, toast } from "./ui.js";
import * as overview from "./pages/overview.js";
import * as signin from "./pages/signin.js";

// sessionStorage, not localStorage: the token is gone when the tab closes, and other tabs do not share it.
const TOKEN_KEY = "grokgate.console.token";

const PAGES = {
  overview: { title: "Overview", load: async () => overview },
  accounts: { title: "Accounts", adminOnly: true, load: () => import("./pages/accounts.js") },
  tokens: { title: "Tokens", adminOnly: true, load: () => import("./pages/tokens.js") },
  usage: { title: "Usage", load: () => import("./pages/usage.js") },
  models: { title: "Models & prices", short: "Models", load: () => import("./pages/models.js") },
  playground: { title: "Playground", load: () => import("./pages/playground.js") },
};

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const session = { api: null, role: null, keys: null, account: null };
let cleanup = null;
let generation = 0; // bumps on every navigation, so a slow page that finishes late does not mark itself ready

function parseHash() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  return { name: path || "overview", params: new URLSearchParams(query) };
}

/** Go to a page; parameters end up in the fragment (never sent to the server). */
export function navigate(name, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v != null)).toString();
  const hash = `#/${name}${query ? `?${query}` : ""}`;
  if (location.hash === hash) route();
  else location.hash = hash;
}

/** The holder's balance in the header, refreshed after anything that spends or adds credits. */
async function refreshAccount() {
  if (session.role !== "holder") return null;
  session.account = await session.api.get("/v1/balance");
  showWho();
  return session.account;
}

function showWho() {
  const label = document.getElementById("who-label");
  if (session.role === "admin") {
    label.textContent = "Admin";
  } else {
    const a = session.account;
    label.textContent = `${a.token.name} · ${credits(a.balance)} credits`;
  }
  who.hidden = false;
}

function buildNav() {
  const items = Object.entries(PAGES).filter(([, p]) => !p.adminOnly || session.role === "admin");
  // A shorter label where the phone layout needs one (the stylesheet picks which is shown).
  clear(nav, ...items.map(([name, p]) => h("a.nav-link", { href: `#/${name}`, dataset: { page: name } },
    p.short ? [h("span.nav-long", p.title), h("span.nav-short", p.short)] : p.title)));
  nav.hidden = false;
}

async function signIn(token) {
  const api = new Api(token);
  const found = await identify(api); // throws an ApiError in words for a bad, expired or disabled token
  sessionStorage.setItem(TOKEN_KEY, token);
  Object.assign(session, { api, role: found.role, keys: found.keys || null, account: found.account || null });
  document.body.dataset.role = found.role;
  buildNav();
  showWho();
  return found;
}

/** Forget the token; `reason` (in words) is shown on the sign-in form when the gateway stopped accepting it. */
function signOut(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  Object.assign(session, { api: null, role: null, keys: null, account: null });
  delete document.body.dataset.role;
  nav.hidden = true;
  who.hidden = true;
  if (typeof reason === "string") {
    showSignIn(reason);
  } else {
    toast("Signed out.");
    showSignIn();
  }
}

function showSignIn(error) {
  generation += 1;
  if (cleanup) cleanup();
  cleanup = null;
  const section = h("section.page", { dataset: { page: "signin" } });
  clear(main, section);
  main.dataset.page = "signin";
  signin.render(section, {
    error,
    submit: async (token) => {
      const found = await signIn(token);
      toast(found.role === "admin" ? "Signed in with the admin token." : `Signed in as ${found.account.token.name}.`);
      navigate(parseHash().name === "signin" ? "overview" : parseHash().name);
    },
  });
  main.dataset.ready = "signin";
}

async function route() {
  if (!session.api) return showSignIn();
  const { name, params } = parseHash();
  const page = PAGES[name] ? name : "overview";
  const spec = PAGES[page];
  const mine = ++generation;
  if (cleanup) cleanup();
  cleanup = null;
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${spec.title} · grokgate console`;
  // A fresh section per visit: a page still loading for an earlier visit writes into a detached node.
  const section = h("section.page", { dataset: { page } });
  clear(main, section);
  main.dataset.page = page;
  delete main.dataset.ready;
  delete main.dataset.painted;
  if (spec.adminOnly && session.role !== "admin") {
    section.append(h("div.notice", h("h1", spec.title), h("p", `Only the admin token can manage ${spec.title.toLowerCase()}.`)));
    main.dataset.ready = page;
    return;
  }
  const ctx = { api: session.api, session, navigate, refreshAccount, route };
  try {
    const module = await spec.load();
    if (mine !== generation) return;
    const result = await module.render(section, ctx, params);
    if (mine !== generation) {
      if (typeof result === "function") result();
      return;
    }
    cleanup = typeof result === "function" ? result : null;
  } catch (error) {
    if (mine !== generation) return;
    // 401: the token was deleted or has expired while the console was open; sign in again.
    if (error.status === 401) return signOut(message(error));
    clear(section, errorBox(error, () => route()));
  }
  main.dataset.ready = page;
  // Two frames later the browser has painted what render() built: that is when the page counts as shown
  // (bench/console_first_paint.py reads this mark).
  requestAnimationFrame(() => requestAnimationFrame(() => {
    if (mine !== generation) return;
    performance.mark(`console:painted:${page}`);
    main.dataset.painted = page;
  }));
}

async function start() {
  document.getElementById("signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", () => route());
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return showSignIn();
  try {
    await signIn(token);
  } catch (error) {
    if (error.status === 401 || error.status === 403) sessionStorage.removeItem(TOKEN_KEY);
    return showSignIn(message(error));
  }
  return route();
}

start();
