// The HTTP client of the console. The bearer token only ever travels in the Authorization header: never in a
// URL (URLs end up in logs and history) and never in console output.

/** An error to show to a person: `message` is the API's own `error.message` or a plain-words fallback. */
export class ApiError extends Error {
  constructor(message, status = 0, code = "") {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const FALLBACK = {
  400: "The gateway did not accept that request.",
  401: "This token was not accepted. Check it and sign in again.",
  403: "This token is not allowed to do that.",
  404: "That was not found; it may have been deleted.",
  413: "That request is too large.",
  429: "Too many requests right now; wait a moment and try again.",
  502: "A backend behind the gateway failed; try again.",
  503: "The gateway is not ready yet; try again shortly.",
  504: "The backend took too long to answer.",
};

/** Turn a failed response into an ApiError, preferring the envelope's message. */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: fall back to words below
  }
  const error = body && typeof body === "object" ? body.error : null;
  if (error && typeof error.message === "string" && error.message) {
    return new ApiError(error.message, response.status, error.code || "");
  }
  const words = FALLBACK[response.status] ||
    (response.status >= 500 ? "The gateway failed to answer; try again." : "The request failed.");
  return new ApiError(words, response.status, "");
}

export function unreachable() {
  return new ApiError("The gateway could not be reached. Check that it is running and try again.", 0, "network");
}

function queryString(query) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") params.set(key, String(value));
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

export class Api {
  constructor(token) {
    this.token = token;
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.token}`, ...extra };
  }

  /** fetch() with the token; network failures become an ApiError in words. Aborts are passed through. */
  async fetch(path, { method = "GET", query, body, signal, accept } = {}) {
    const headers = this.headers(accept ? { Accept: accept } : {});
    const init = { method, headers, signal, cache: "no-store", referrerPolicy: "no-referrer" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    try {
      return await fetch(path + queryString(query), init);
    } catch (exc) {
      if (exc && exc.name === "AbortError") throw exc;
      throw unreachable();
    }
  }

  /** JSON in, JSON out; any status outside `allow` and 2xx becomes an ApiError. */
  async call(method, path, { query, body, signal, allow = [] } = {}) {
    const response = await this.fetch(path, { method, query, body, signal });
    if (!response.ok && !allow.includes(response.status)) throw await errorFrom(response);
    return response.status === 204 ? null : response.json();
  }

  get(path, query, options = {}) {
    return this.call("GET", path, { ...options, query });
  }

  post(path, body) {
    return this.call("POST", path, { body });
  }

  patch(path, body) {
    return this.call("PATCH", path, { body });
  }

  put(path, body) {
    return this.call("PUT", path, { body });
  }

  delete(path) {
    return this.call("DELETE", path);
  }

  /** A text body (CSV) with its response headers. */
  async text(path, query) {
    const response = await this.fetch(path, { query });
    if (!response.ok) throw await errorFrom(response);
    return { text: await response.text(), headers: response.headers };
  }
}

/** Who holds this token: "admin" (may call /admin/*) or "holder" (an account token), with what we learnt. */
export async function identify(api) {
  const response = await api.fetch("/admin/keys");
  if (response.ok) {
    const keys = await response.json();
    return { role: "admin", keys: keys.data };
  }
  const error = await errorFrom(response);
  if (response.status !== 403 || error.code !== "forbidden") throw error;
  const account = await api.get("/v1/balance");
  return { role: "holder", account };
}
