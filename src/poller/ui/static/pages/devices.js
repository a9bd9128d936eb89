// Devices: search, filters, order and paging all done by the server
// (GET /api/devices); a page is O(page size) whatever the fleet.
import { api } from "../api.js";
import { h, num, when } from "../util.js";

const STATES = ["", "ok", "failing", "auth_failed", "pending", "stopped", "disabled", "unpolled"];
const DRIVERS = ["", "eagle-cloud", "eagle-local", "http-json"];
const SIZES = ["25", "50", "100", "250"];
const back = [];   // cursors of the pages before this one, for "Previous"

function select(id, label, options, value) {
  return h("label", { for: id }, label, h("select", { id, name: id },
    options.map(([v, text]) => h("option", { value: v, selected: v === value }, text))));
}

function go(params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) query.set(k, v);
  location.hash = `#/devices?${query}`;
}

export async function mount(root, { query }) {
  const q = query.get("q") || "";
  const state = query.get("state") || "";
  const driver = query.get("driver") || "";
  const order = state ? "asc" : (query.get("order") || "asc");
  const limit = SIZES.includes(query.get("limit")) ? query.get("limit") : "50";
  const after = query.get("after") || "";
  const filters = { q, state, driver, order, limit };

  const form = h("form", { class: "toolbar", role: "search" },
    h("label", { for: "q" }, "Search id or email",
      h("input", { id: "q", name: "q", type: "search", value: q, maxlength: 64,
                   placeholder: "f00012 or name@" })),
    select("state", "State", STATES.map((s) => [s, s || "any"]), state),
    select("driver", "Driver", DRIVERS.map((d) => [d, d || "any"]), driver),
    select("order", "Order", [["asc", "oldest first"], ["desc", "newest first"]], order),
    select("limit", "Per page", SIZES.map((s) => [s, s]), limit),
    h("button", { type: "submit", class: "primary" }, "Show"));
  form.querySelector("#order").disabled = Boolean(state);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    back.length = 0;
    go({ q: data.get("q").trim(), state: data.get("state"), driver: data.get("driver"),
         order: data.get("order"), limit: data.get("limit") });
  });
  root.append(h("h1", {}, "Devices"), form);

  const params = new URLSearchParams({ limit });
  if (q) params.set("q", q);
  if (state) params.set("state", state);
  if (driver) params.set("driver", driver);
  if (order === "desc") params.set("order", "desc");
  if (after) params.set("after", after);
  const started = performance.now();
  const doc = await api(`/api/devices?${params}`);
  const took = performance.now() - started;

  const rows = doc.devices.map((d) => h("tr", {},
    h("td", {}, h("a", { href: `#/device/${encodeURIComponent(d.cloud_id)}` }, d.cloud_id)),
    h("td", {}, d.email || "–"),
    h("td", {}, d.driver),
    h("td", { class: "num" }, num(d.interval_s, 1)),
    h("td", {}, h("span", { class: `state ${d.state}` }, d.state)),
    h("td", {}, d.status?.last_outcome ?? "–"),
    h("td", {}, d.status?.last_error ?? ""),
    h("td", {}, when(d.status?.last_poll_at ?? null))));
  root.append(h("table", { "data-table": "devices" },
    h("thead", {}, h("tr", {}, ["device", "email", "driver", "interval s", "state",
      "last outcome", "last error", "last poll"].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows.length ? rows
      : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No device on this page.")))));

  const prev = h("button", { type: "button", disabled: !back.length }, "Previous");
  const next = h("button", { type: "button", disabled: doc.next_after === null }, "Next");
  prev.addEventListener("click", () => go({ ...filters, after: back.pop() || "" }));
  next.addEventListener("click", () => {
    back.push(after);
    go({ ...filters, after: String(doc.next_after) });
  });
  root.append(h("div", { class: "pager" }, prev, next,
    h("span", { class: "muted", "data-field": "page-info" },
      `${num(doc.devices.length)} shown · answered in ${num(took)} ms`,
      doc.next_after !== null && doc.devices.length < Number(limit)
        ? " · a filtered page can hold fewer rows: Next goes on" : "")));
}
