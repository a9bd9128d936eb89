// Fleet: states, polling rate against expected, lateness, storage backlog,
// the most-failing devices, and the fleet's total demand (rollups).
import { api, serves } from "../api.js";
import { every } from "../live.js";
import { lineChart } from "../chart.js";
import { bytes, card, h, notAvailable, num, seconds } from "../util.js";

const REFRESH_MS = 5000;
const FAILING_SCAN = 200;   // failing devices read (by id) to pick the worst from
const WORST = 10;
const STATES = ["ok", "failing", "auth_failed", "pending", "stopped"];

function field(label, value, name, raw, cls = "") {
  const c = card(label, value, name, cls);
  c.querySelector("dd").dataset.value = JSON.stringify(raw);
  return c;
}

// "last hour", or how much of it the service has been up for.
function windowLabel(spanS) {
  return spanS >= 3540 ? "last hour" : `last ${Math.max(1, Math.round(spanS / 60))} min`;
}

function renderSnapshot(box, f, reg) {
  const rate = Object.values(f.polls_per_s).reduce((a, b) => a + b, 0);
  box.replaceChildren(
    h("h2", {}, "Devices"),
    h("dl", { class: "cards" },
      field("polled", num(f.devices), "devices", f.devices),
      STATES.map((s) => field(s.replace("_", " "), num(f.devices_by_state[s] ?? 0),
        `devices_by_state.${s}`, f.devices_by_state[s] ?? 0, s)),
      reg ? field("disabled", num(reg.disabled), "registered.disabled", reg.disabled, "disabled")
        : null,
      reg ? field("registered", num(reg.registered), "registered.registered", reg.registered)
        : null),
    h("h2", {}, "Polling"),
    h("dl", { class: "cards" },
      field("polls / s", num(rate, 1), "polls_per_s.total", rate),
      field("expected / s", num(f.expected_polls_per_s, 1), "expected_polls_per_s",
        f.expected_polls_per_s),
      field("ok / s", num(f.polls_per_s.ok ?? 0, 1), "polls_per_s.ok", f.polls_per_s.ok ?? 0),
      field(`lateness p50 (${windowLabel(f.lateness_window_s)})`,
        seconds(f.lateness_window_p50_s), "lateness_window_p50_s", f.lateness_window_p50_s),
      field(`lateness p99 (${windowLabel(f.lateness_window_s)})`,
        seconds(f.lateness_window_p99_s), "lateness_window_p99_s", f.lateness_window_p99_s,
        f.lateness_window_p99_s > 0.1 ? "bad" : ""),
      field("in flight", num(f.in_flight), "in_flight", f.in_flight),
      field("skipped ticks", num(f.skipped_ticks), "skipped_ticks", f.skipped_ticks)),
    h("h2", {}, "Storage"),
    h("dl", { class: "cards" },
      field("ingest lag", seconds(f.ingest_lag_s), "ingest_lag_s", f.ingest_lag_s,
        f.ingest_lag_s > 30 ? "bad" : ""),
      field("buffer rows", num(f.buffer_rows), "buffer_rows", f.buffer_rows),
      field("rows committed", num(f.rows_committed), "rows_committed", f.rows_committed),
      field("spool", bytes(f.spool_bytes), "spool_bytes", f.spool_bytes),
      field("segments to upload", num(f.segments_pending_upload), "segments_pending_upload",
        f.segments_pending_upload, f.segments_pending_upload > 2 ? "bad" : ""),
      field("upload lag", seconds(f.upload_lag_s), "upload_lag_s", f.upload_lag_s),
      field("rows quarantined", num(f.rows_quarantined), "rows_quarantined",
        f.rows_quarantined, f.rows_quarantined ? "bad" : ""),
      field("disk used", `${num(f.disk_used_fraction * 100, 1)} %`, "disk_used_fraction",
        f.disk_used_fraction, f.disk_warning ? "bad" : "")),
    h("p", { class: "status-line", "data-field": "components" },
      `instance ${f.instance_id} · postgres ${f.postgres_up ? "up" : "DOWN"} · redis `,
      `${f.redis_up ? "up" : "DOWN"} · s3 ${f.s3_up ? "up" : "DOWN"} · polling `,
      f.polling ? "on" : "OFF"));
}

async function worstDevices() {
  // Ranked by the server over the whole fleet; an older server: the worst of
  // the first FAILING_SCAN devices of each failing state.
  if (serves("/api/fleet/failing")) {
    return (await api(`/api/fleet/failing?limit=${WORST}`)).devices;
  }
  const pages = await Promise.all(["failing", "auth_failed"].map(
    (state) => api(`/api/devices?state=${state}&limit=${FAILING_SCAN}`)));
  const all = pages.flatMap((p) => p.devices);
  all.sort((a, b) => (b.status?.consecutive_failures ?? 0) - (a.status?.consecutive_failures ?? 0));
  return all.slice(0, WORST);
}

function renderWorst(box, devices) {
  if (!devices.length) {
    box.replaceChildren(h("p", { class: "muted" }, "No device is failing."));
    return;
  }
  box.replaceChildren(h("table", { "data-table": "worst" },
    h("thead", {}, h("tr", {}, h("th", {}, "device"), h("th", {}, "state"),
      h("th", { class: "num" }, "failures in a row"), h("th", {}, "last outcome"),
      h("th", {}, "last error"))),
    h("tbody", {}, devices.map((d) => h("tr", {},
      h("td", {}, h("a", { href: `#/device/${encodeURIComponent(d.cloud_id)}` }, d.cloud_id)),
      h("td", {}, h("span", { class: `state ${d.state}` }, d.state)),
      h("td", { class: "num" }, num(d.status?.consecutive_failures)),
      h("td", {}, d.status?.last_outcome ?? "–"),
      h("td", {}, d.status?.last_error ?? "–"))))));
}

async function demand(box) {
  if (!serves("/api/fleet/demand")) {
    box.replaceChildren(notAvailable("fleet demand",
      "This server has no GET /api/fleet/demand yet (it comes with the rollups)."));
    return;
  }
  const to = Math.floor(Date.now() / 1000);
  const doc = await api(`/api/fleet/demand?from=${to - 86400}&to=${to}&step=300`);
  const xs = doc.points.map((p) => Date.parse(p.t) / 1000);
  const ys = doc.points.map((p) => p.total_w);
  box.replaceChildren();
  lineChart(box, { series: [{ label: "total W", values: ys }], xs, src: "/api/fleet/demand",
                   level: doc.level });
}

export async function mount(root) {
  const snap = h("div", { "data-part": "snapshot" });
  const worst = h("div", { "data-part": "worst" });
  const chart = h("div", { "data-part": "demand", class: "panel" });
  root.append(h("h1", {}, "Fleet"), snap, h("h2", {}, "Most failing devices"), worst,
              h("h2", {}, "Fleet demand, last day"), chart);
  let reg = null;
  let ticks = 0;
  async function refresh() {
    if (ticks++ % 6 === 0) reg = await api("/api/fleet/registered");
    renderSnapshot(snap, await api("/api/fleet"), reg);
    renderWorst(worst, await worstDevices());
  }
  await refresh();
  await demand(chart);
  const stopSnap = every(REFRESH_MS, refresh);
  const stopDemand = every(60_000, () => demand(chart));
  return () => { stopSnap(); stopDemand(); };
}
