// The dashboard's shell: sign-in, a hash router (#/fleet, #/devices,
// #/device/ID, #/archive) and the live-refresh timer each page uses.
import { ApiError, session, signIn, signOut } from "./api.js";
import { h } from "./util.js";
import * as fleet from "./pages/fleet.js";
import * as devices from "./pages/devices.js";
import * as device from "./pages/device.js";
import * as archive from "./pages/archive.js";

const PAGES = { fleet, devices, device, archive };
const $ = (id) => document.getElementById(id);
let unmount = null;

function route() {
  const hash = location.hash.replace(/^#\/?/, "") || "fleet";
  const [path, query = ""] = hash.split("?");
  const [name, ...rest] = path.split("/");
  return { name: PAGES[name] ? name : "fleet", arg: decodeURIComponent(rest.join("/")),
           query: new URLSearchParams(query) };
}

async function show() {
  if (unmount) { unmount(); unmount = null; }
  const { name, arg, query } = route();
  const page = $("page");
  page.replaceChildren();
  for (const a of document.querySelectorAll("#nav a")) {
    const current = a.dataset.page === name || (name === "device" && a.dataset.page === "devices");
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const view = h("section", { "data-page": name, "aria-busy": "true" });
  page.append(view);
  try {
    unmount = await PAGES[name].mount(view, { arg, query }) || null;
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 401) { return loggedOut("The token was refused."); }
    view.append(h("p", { class: "error", role: "alert" }, `Error: ${exc.message}`));
  } finally {
    view.setAttribute("aria-busy", "false");
  }
}

function loggedIn() {
  $("login").hidden = true;
  $("nav").hidden = false;
  $("logout").hidden = session.open;
  $("who").textContent = session.open ? "open API (no token configured)"
    : session.access === "admin" ? "admin" : "read only";
  document.body.dataset.access = session.access;
  show();
}

function loggedOut(message = "") {
  signOut();
  if (unmount) { unmount(); unmount = null; }
  $("page").replaceChildren();
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  delete document.body.dataset.access;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("token").focus();
}

async function start() {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    $("token").value = "";
    try {
      await signIn(token);
    } catch (exc) {
      loggedOut(exc instanceof ApiError && exc.status === 401
        ? "This token is not valid for this server." : `Sign-in failed: ${exc.message}`);
      return;
    }
    loggedIn();
  });
  $("logout").addEventListener("click", () => loggedOut());
  window.addEventListener("hashchange", () => { if (session.access) show(); });
  // A token from earlier in this tab, or none: an API without tokens
  // (loopback only) lets the page in without a form.
  try {
    await signIn(session.token);
    loggedIn();
  } catch (exc) {
    loggedOut(session.token && !(exc instanceof ApiError && exc.code === "unauthorized")
      ? `Sign-in failed: ${exc.message}` : "");
  }
}

start();
