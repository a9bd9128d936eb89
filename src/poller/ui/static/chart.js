// Time-series charts on the vendored uPlot (one canvas, columnar arrays).
// The element keeps its chart as `.uplot` and the URL its data came from in
// data-src, so a test can compare what is drawn with what the API answers.
import uPlot from "./vendor/uPlot.esm.js";

const COLORS = ["#2456c8", "#9aa9d6", "#9aa9d6", "#c62828", "#1f8a4c"];

export function lineChart(box, { xs, series, src = "", level = "", onZoom = null, bars = false,
                                  range = null }) {
  const width = Math.max(320, box.clientWidth - 16);
  const opts = {
    width, height: 300,
    cursor: { drag: { x: true, y: false, setScale: !onZoom } },
    // The range asked for, not the data's: an hour with two readings is
    // still drawn as an hour.
    scales: { x: range ? { time: true, range: () => range } : { time: true } },
    legend: { live: true },
    series: [{}, ...series.map((s, i) => ({
      label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: s.width ?? 1.5,
      fill: bars ? (s.color || COLORS[i % COLORS.length]) + "55" : undefined,
      paths: bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined,
      spanGaps: false, points: { show: xs.length < 300, size: 4 },
    }))],
    axes: [{}, { size: 60 }],
    hooks: onZoom ? { setSelect: [(u) => {
      if (u.select.width < 3) return;
      const from = u.posToVal(u.select.left, "x");
      const to = u.posToVal(u.select.left + u.select.width, "x");
      u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
      onZoom(Math.floor(from), Math.ceil(to));
    }] } : {},
  };
  const plot = new uPlot(opts, [xs, ...series.map((s) => s.values)], box);
  box.uplot = plot;
  box.dataset.src = src;
  box.dataset.points = String(xs.length);
  box.dataset.level = level || "";
  const observer = new ResizeObserver(() => {
    const w = Math.max(320, box.clientWidth - 16);
    if (Math.abs(w - plot.width) > 4) plot.setSize({ width: w, height: 300 });
  });
  observer.observe(box);
  return () => { observer.disconnect(); plot.destroy(); };
}
