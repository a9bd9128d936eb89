// Archive: hours uploaded per day, bytes, what is missing or behind, and
// what each retention level holds (GET /api/archive).
import { api, serves } from "../api.js";
import { bytes, h, notAvailable, num } from "../util.js";

const DAYS = 14;

export async function mount(root) {
  root.append(h("h1", {}, "Archive"));
  if (!serves("/api/archive")) {
    root.append(notAvailable("archive status", "This server has no GET /api/archive yet "
      + "(it comes with retention). Segments still go to S3 every hour; see /metrics "
      + "(poller_segments_pending_upload) and the Fleet page's storage figures."));
    return null;
  }
  const doc = await api(`/api/archive?days=${DAYS}`);
  const mostBytes = Math.max(1, ...doc.days.map((d) => d.bytes));
  root.append(h("h2", {}, `Last ${DAYS} days`), h("table", { "data-table": "days" },
    h("thead", {}, h("tr", {}, ["day", "hours uploaded", "", "bytes", "missing hours", "state"]
      .map((t) => h("th", {}, t)))),
    h("tbody", {}, doc.days.map((d) => {
      const bar = h("div", { class: d.missing.length ? "bar miss" : "bar" });
      bar.style.width = `${Math.round((100 * d.bytes) / mostBytes)}%`;
      return h("tr", {},
        h("td", {}, d.day),
        h("td", { class: "num" }, `${num(d.hours_uploaded)} / ${num(d.hours_expected)}`),
        h("td", {}, bar),
        h("td", { class: "num" }, bytes(d.bytes)),
        h("td", {}, d.missing.length ? d.missing.join(", ") : "none"),
        h("td", {}, d.behind ? h("span", { class: "state failing" }, "behind")
          : d.missing.length ? h("span", { class: "state auth_failed" }, "missing")
            : h("span", { class: "state ok" }, "complete")));
    }))));
  root.append(h("h2", {}, "Retention levels"), h("table", { "data-table": "levels" },
    h("thead", {}, h("tr", {}, ["level", "kept (days)", "oldest", "newest", "rows", "bytes"]
      .map((t) => h("th", {}, t)))),
    h("tbody", {}, doc.levels.map((l) => h("tr", {},
      h("td", {}, l.level), h("td", { class: "num" }, l.keep_days ?? "forever"),
      h("td", {}, l.oldest ?? "–"), h("td", {}, l.newest ?? "–"),
      h("td", { class: "num" }, num(l.rows)), h("td", { class: "num" }, bytes(l.bytes)))))));
  return null;
}
