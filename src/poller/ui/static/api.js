// The API as the dashboard uses it: the token from sessionStorage in an
// Authorization header (never a cookie, never a URL), JSON errors as ApiError.

const TOKEN_KEY = "poller.token";

export const session = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  access: null,          // "admin" or "read", from GET /api/session
  open: false,           // the API has no token configured (loopback only)
  paths: new Set(),      // what this server serves, from its OpenAPI document
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {
      method, headers, cache: "no-store", credentials: "omit", redirect: "error",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    throw new ApiError(0, "network", `the server did not answer (${exc.message})`);
  }
  let doc = null;
  try { doc = await resp.json(); } catch { doc = null; }
  if (!resp.ok) {
    const err = (doc && doc.error) || {};
    throw new ApiError(resp.status, err.code || `http_${resp.status}`,
      err.message || resp.statusText);
  }
  return doc;
}

/** Does this server serve `template` (an OpenAPI path such as /api/archive)? */
export function serves(template) {
  return session.paths.has(template);
}

export async function signIn(token) {
  session.token = token;
  try {
    const who = await api("/api/session");
    if (who.access === "none") throw new ApiError(401, "unauthorized", "a token is needed");
    session.access = who.access;
    session.open = who.open;
    const doc = await api("/api/openapi.json");
    session.paths = new Set(Object.keys(doc.paths || {}));
  } catch (exc) {
    session.token = "";
    session.access = null;
    throw exc;
  }
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = "";
  session.access = null;
  session.paths = new Set();
}
