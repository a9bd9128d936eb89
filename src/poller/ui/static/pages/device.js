// Device: live latest reading, demand chart (ranges and zoom; the API picks
// raw, minute or hour data), energy per day, outcomes, registration, and for
// the admin token: interval, enable/disable, remove, each confirmed.
import { api, session } from "../api.js";
import { every } from "../live.js";
import { lineChart } from "../chart.js";
import { h, notAvailable, num, when } from "../util.js";

// Range -> [seconds, bucket seconds]: every range stays under the API's
// 10,000 buckets a request (one year of hours is 8,760).
const RANGES = { "1h": [3600, 1], "1d": [86400, 10], "1w": [604800, 120],
                 "1mo": [2592000, 300], "1y": [31536000, 3600] };
const ZOOM_POINTS = 4000;
const DAYS_OF_ENERGY = 30;

function nowS() { return Math.floor(Date.now() / 1000); }

function liveView(box, event) {
  const r = event.reading;
  if (!r) {
    box.replaceChildren(h("p", { class: "muted", "data-field": "live-demand" }, "No reading yet."));
    return;
  }
  const out = h("div", {},
    h("div", { class: "live" }, h("span", { "data-field": "live-demand",
      "data-tick": String(r.tick_at) }, r.demand_w === null ? "–" : `${num(r.demand_w, 1)} W`)),
    h("dl", { class: "kv" },
      h("dt", {}, "scheduled"), h("dd", { "data-field": "live-tick" }, when(r.tick_at)),
      h("dt", {}, "device time"), h("dd", {}, when(r.device_at)),
      h("dt", {}, "received"), h("dd", {}, when(r.received_at)),
      h("dt", {}, "delivered"), h("dd", {}, r.delivered_wh === null ? "–" : `${num(r.delivered_wh)} Wh`),
      h("dt", {}, "received (export)"), h("dd", {}, r.received_wh === null ? "–" : `${num(r.received_wh)} Wh`),
      h("dt", {}, "source"), h("dd", {}, event.source)));
  box.replaceChildren(out);
}

function outcomes(box, device) {
  const st = device.status;
  if (!st) {
    box.replaceChildren(h("p", { class: "muted" }, `Not polled by this instance (${device.state}).`));
    return;
  }
  const failures = Object.entries(st.failures || {}).sort((a, b) => b[1] - a[1]);
  box.replaceChildren(h("table", { "data-table": "outcomes" },
    h("thead", {}, h("tr", {}, h("th", {}, "outcome (since start)"), h("th", { class: "num" }, "polls"))),
    h("tbody", {},
      h("tr", {}, h("td", {}, "ok (readings)"), h("td", { class: "num" }, num(st.total_events_logged))),
      failures.map(([o, n]) => h("tr", {}, h("td", {}, o), h("td", { class: "num" }, num(n)))))),
    h("p", { class: "status-line" }, `last outcome ${st.last_outcome ?? "–"} · `,
      `${num(st.consecutive_failures)} failures in a row · last error: ${st.last_error ?? "none"}`));
}

function registration(device) {
  const rows = [["cloud id", device.cloud_id], ["email", device.email || "–"],
    ["driver", device.driver], ["url", device.url || "(driver default)"],
    ["interval", `${num(device.interval_s, 1)} s`], ["enabled", device.enabled ? "yes" : "no"],
    ["registered", device.created_at], ["changed", device.updated_at],
    ["options", JSON.stringify(device.options || {})]];
  return h("dl", { class: "kv", "data-part": "registration" },
    rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    h("dt", {}, "password"), h("dd", { class: "muted" }, "sealed; never shown"));
}

function confirmDialog(text, action) {
  return new Promise((resolve) => {
    const yes = h("button", { type: "button", class: "danger", "data-confirm": "yes" }, action);
    const no = h("button", { type: "button", "data-confirm": "no" }, "Cancel");
    const dialog = h("dialog", { "aria-label": "Confirm" }, h("p", {}, text),
      h("div", { class: "toolbar" }, yes, no));
    const done = (answer) => { dialog.close(); dialog.remove(); resolve(answer); };
    yes.addEventListener("click", () => done(true));
    no.addEventListener("click", () => done(false));
    dialog.addEventListener("cancel", () => done(false));
    document.body.append(dialog);
    dialog.showModal();
    no.focus();
  });
}

function adminControls(device, reload, message = "") {
  const msg = h("p", { class: "status-line", role: "status", "data-field": "admin-message" },
    message);
  const cid = encodeURIComponent(device.cloud_id);
  async function write(what, text, action, call) {
    if (!await confirmDialog(text, action)) { msg.textContent = `${what}: cancelled`; return; }
    try {
      await call();
      await reload(`${what}: done`);
    } catch (exc) {
      msg.textContent = `${what} refused: ${exc.message}`;
    }
  }
  const interval = h("input", { id: "interval", type: "number", min: "0.1", max: "86400",
    step: "0.1", value: device.interval_s, required: true });
  const intervalForm = h("form", {}, h("label", { for: "interval" }, "Interval (s) ", interval),
    h("button", { type: "submit" }, "Change interval"));
  intervalForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = Number(interval.value);
    write("interval", `Poll ${device.cloud_id} every ${value} s?`, "Change", () =>
      api(`/api/user/${cid}`, { method: "POST", body: { interval_s: value } }));
  });
  const toggle = h("button", { type: "button", "data-action": "toggle" },
    device.enabled ? "Disable" : "Enable");
  toggle.addEventListener("click", () => write(device.enabled ? "disable" : "enable",
    `${device.enabled ? "Stop" : "Start"} polling ${device.cloud_id}?`,
    device.enabled ? "Disable" : "Enable",
    () => api(`/api/user/${cid}`, { method: "POST", body: { enabled: !device.enabled } })));
  const remove = h("button", { type: "button", class: "danger", "data-action": "remove" }, "Remove");
  remove.addEventListener("click", () => write("remove",
    `Remove ${device.cloud_id}? Polling stops and its credentials are wiped; readings stay.`,
    "Remove", async () => {
      await api(`/api/user/${cid}`, { method: "DELETE" });
      location.hash = "#/devices";
    }));
  return h("section", { class: "panel admin", "data-part": "admin" },
    h("h2", {}, "Admin"), intervalForm, h("div", { class: "toolbar" }, toggle, remove), msg);
}

async function energy(box, cid) {
  const to = Math.floor(nowS() / 86400) * 86400 + 86400;
  const src = `/api/devices/${cid}/readings?from=${to - DAYS_OF_ENERGY * 86400}&to=${to}&step=86400`;
  const doc = await api(src);
  if (!doc.points.length || !("energy_delivered_wh" in doc.points[0])) {
    box.replaceChildren(notAvailable("energy per day", "The readings API of this server does "
      + "not give energy per bucket yet (it comes with the rollups)."));
    return;
  }
  box.replaceChildren();
  lineChart(box, { xs: doc.points.map((p) => Date.parse(p.t) / 1000), bars: true, src,
    range: [to - DAYS_OF_ENERGY * 86400, to],
    level: doc.level, series: [
      { label: "delivered Wh", values: doc.points.map((p) => p.energy_delivered_wh), color: "#2456c8" },
      { label: "received Wh", values: doc.points.map((p) => p.energy_received_wh), color: "#1f8a4c" }] });
}

export async function mount(root, { arg }) {
  const cid = encodeURIComponent(arg);
  let device = await api(`/api/devices/${cid}`);
  const state = h("span", { class: `state ${device.state}`, "data-field": "state" }, device.state);
  root.append(h("h1", {}, `Device ${device.cloud_id} `, state));

  const live = h("div", { class: "panel", "data-part": "live" });
  const chartBox = h("div", { class: "chart", "data-part": "demand" });
  const levelLine = h("p", { class: "status-line", "data-field": "level" });
  const failedBox = h("div", { "data-part": "failed" });
  const energyBox = h("div", { class: "panel", "data-part": "energy" });
  const outcomeBox = h("div", { "data-part": "outcomes" });
  const reset = h("button", { type: "button", hidden: true }, "Reset zoom");
  let range = "1h";
  let dropChart = null;
  const buttons = Object.keys(RANGES).map((name) => {
    const b = h("button", { type: "button", "data-range": name, "aria-pressed": String(name === range) }, name);
    b.addEventListener("click", () => { range = name; show(nowS() - RANGES[name][0], nowS(), RANGES[name][1]); });
    return b;
  });
  reset.addEventListener("click", () => buttons.find((b) => b.dataset.range === range).click());

  async function show(from, to, step, zoomed = false) {
    step = Math.max(step, Math.ceil((to - from) / 10000));
    for (const b of buttons) b.setAttribute("aria-pressed", String(!zoomed && b.dataset.range === range));
    reset.hidden = !zoomed;
    const src = `/api/devices/${cid}/readings?from=${from}&to=${to}&step=${step}`;
    const doc = await api(src);
    if (dropChart) dropChart();
    chartBox.replaceChildren();
    const pts = doc.points;
    dropChart = lineChart(chartBox, {
      xs: pts.map((p) => Date.parse(p.t) / 1000), src, level: doc.level, range: [from, to],
      series: [{ label: "avg W", values: pts.map((p) => p.avg), width: 2 },
               { label: "min W", values: pts.map((p) => p.min), width: 1 },
               { label: "max W", values: pts.map((p) => p.max), width: 1 }],
      onZoom: (a, b) => show(a, b, Math.max(1, Math.ceil((b - a) / ZOOM_POINTS)), true) });
    levelLine.textContent = `${num(pts.length)} buckets of ${step} s · data level: `
      + (doc.level ?? "not reported by this server") + " · drag across the chart to zoom";
    if (pts.length && "failed" in pts[0]) {
      failedBox.replaceChildren(h("h3", {}, "Failed polls per bucket"));
      lineChart(failedBox.appendChild(h("div", { class: "chart" })), { bars: true, src,
        range: [from, to],
        xs: pts.map((p) => Date.parse(p.t) / 1000),
        series: [{ label: "failed", values: pts.map((p) => p.failed), color: "#c62828" }] });
    } else {
      failedBox.replaceChildren(notAvailable("failed polls over time", "The readings API of "
        + "this server does not count failed polls per bucket yet (it comes with the rollups)."));
    }
  }

  async function reload(message = "") {
    device = await api(`/api/devices/${cid}`);
    state.textContent = device.state;
    state.className = `state ${device.state}`;
    outcomes(outcomeBox, device);
    regBox.replaceChildren(registration(device));
    if (adminBox) adminBox.replaceChildren(adminControls(device, reload, message));
  }

  const regBox = h("div", { class: "panel" }, registration(device));
  const adminBox = session.access === "admin" ? h("div", {}, adminControls(device, reload)) : null;
  root.append(
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Latest reading (live)"), live),
      h("section", {}, h("h2", {}, "Registration"), regBox)),
    h("h2", {}, "Demand"), h("div", { class: "ranges", role: "group", "aria-label": "Range" }, buttons, reset),
    chartBox, levelLine, failedBox,
    h("h2", {}, `Energy per day, last ${DAYS_OF_ENERGY} days`), energyBox,
    h("h2", {}, "Outcomes"), outcomeBox, adminBox);
  outcomes(outcomeBox, device);
  liveView(live, await api(`/api/event/${cid}`));
  await show(nowS() - RANGES[range][0], nowS(), RANGES[range][1]);
  await energy(energyBox, cid);

  const periodMs = Math.min(10, Math.max(1, device.interval_s)) * 1000;
  const stopLive = every(periodMs, async () => liveView(live, await api(`/api/event/${cid}`)));
  const stopStatus = every(Math.max(periodMs, 5000), async () => {
    device = await api(`/api/devices/${cid}`);
    state.textContent = device.state;
    state.className = `state ${device.state}`;
    outcomes(outcomeBox, device);
  });
  return () => { stopLive(); stopStatus(); if (dropChart) dropChart(); };
}
