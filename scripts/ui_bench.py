"""Measure the dashboard in headless chromium (a harness, not a test).

  .venv/bin/python scripts/ui_bench.py charts            # uPlot against server-made SVG
  .venv/bin/python scripts/ui_bench.py fleet [--devices 100000] [--interval 60]

`charts`: 8,760 and 14,400 points drawn by the vendored uPlot, and the same
series as an SVG path made in Python and drawn as an image (median of 7).
`fleet`: an embedded stack in a temporary directory, N simulated devices
registered and polled by `poller serve`, one device given a year of hourly
readings; then the time until the Fleet page is complete and until the
Device page's one-year chart is drawn. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, Route, sync_playwright

STATIC = Path(__file__).resolve().parents[1] / "src" / "poller" / "ui" / "static"
CHROMIUM = "/usr/bin/chromium"
RUNS = 7

_BENCH_HTML = """<!doctype html><html><head><meta charset="utf-8">
<link rel="stylesheet" href="vendor/uPlot.min.css"></head>
<body><div id="box"></div><script type="module" src="bench.js"></script></body></html>"""
_BENCH_JS = """import uPlot from "./vendor/uPlot.esm.js";
const frame = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
window.uplotRun = async (n) => {
  const box = document.getElementById("box"); box.replaceChildren();
  const t0 = performance.now();
  const doc = await (await fetch(`/ui/series.json?n=${n}`)).json();
  const xs = doc.points.map((p) => Date.parse(p.t) / 1000);
  const ys = doc.points.map((p) => p.avg);
  const t1 = performance.now();
  new uPlot({ width: 1200, height: 300, scales: { x: { time: true } },
              series: [{}, { stroke: "#2456c8", points: { show: false } }] }, [xs, ys], box);
  await frame();
  return [performance.now() - t0, performance.now() - t1];
};
window.svgRun = async (n) => {
  const box = document.getElementById("box"); box.replaceChildren();
  const t0 = performance.now();
  const img = new Image(); img.src = `/ui/series.svg?n=${n}&r=${Math.random()}`;
  await img.decode(); const t1 = performance.now(); box.append(img); await frame();
  return [performance.now() - t0, performance.now() - t1];
};"""


def _series(n: int) -> tuple[list[float], list[float]]:
    rng = random.Random(n)
    start = 1_700_000_000
    step = 31_536_000 / n
    xs = [start + i * step for i in range(n)]
    ys = [800 + 600 * math.sin(i / 200) + rng.uniform(-150, 150) for i in range(n)]
    return xs, ys


def _series_json(n: int) -> bytes:
    from datetime import UTC, datetime
    xs, ys = _series(n)
    return json.dumps({"points": [
        {"t": datetime.fromtimestamp(x, UTC).isoformat(), "min": y - 5, "avg": y, "max": y + 5,
         "count": 6} for x, y in zip(xs, ys, strict=True)]}).encode()


def _series_svg(n: int) -> bytes:
    """What a server-made chart would cost: a path scaled to 1200x300 (no axes)."""
    xs, ys = _series(n)
    x0, x1, lo, hi = xs[0], xs[-1], min(ys), max(ys)
    d = "M" + "L".join(f"{(x - x0) * 1200 / (x1 - x0):.1f},{300 - (y - lo) * 300 / (hi - lo):.1f}"
                       for x, y in zip(xs, ys, strict=True))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="1200" height="300">'
            f'<path d="{d}" fill="none" stroke="#2456c8" stroke-width="1.5"/></svg>').encode()


def charts() -> None:
    def serve(route: Route) -> None:
        path = route.request.url.split("://", 1)[1].split("/", 1)[1].split("?")[0]
        query = route.request.url.partition("?")[2]
        n = int(re.search(r"n=(\d+)", query).group(1)) if "n=" in query else 0  # type: ignore[union-attr]
        if path == "ui/bench.html":
            route.fulfill(body=_BENCH_HTML, content_type="text/html")
        elif path == "ui/bench.js":
            route.fulfill(body=_BENCH_JS, content_type="text/javascript")
        elif path == "ui/series.json":
            route.fulfill(body=_series_json(n), content_type="application/json")
        elif path == "ui/series.svg":
            route.fulfill(body=_series_svg(n), content_type="image/svg+xml")
        else:
            file = STATIC / path.removeprefix("ui/")
            kind = "text/javascript" if file.suffix == ".js" else "text/css"
            route.fulfill(body=file.read_bytes(), content_type=kind)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.route("http://bench.invalid/**", serve)
        page.goto("http://bench.invalid/ui/bench.html")
        page.wait_for_function("typeof window.uplotRun === 'function'")
        for n in (8_760, 14_400):
            t0 = time.perf_counter()
            svg = _series_svg(n)
            made_ms = (time.perf_counter() - t0) * 1000
            for kind in ("uplot", "svg"):
                runs = [page.evaluate(f"{kind}Run({n})") for _ in range(RUNS)]
                total = [r[0] for r in runs]
                draw = [r[1] for r in runs]
                extra = f" (+ {made_ms:.1f} ms to make the SVG, {len(svg) // 1024} KiB)" \
                    if kind == "svg" else f" (JSON {len(_series_json(n)) // 1024} KiB)"
                print(f"{kind:6} {n:6,} points: load+draw median {statistics.median(total):6.1f}"
                      f" ms (max {max(total):6.1f}); draw alone median "
                      f"{statistics.median(draw):5.1f} ms{extra}")
        browser.close()


def _env(info: object, db_url: str, state: Path, interval: float) -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.servicefix import service_env
    return {**os.environ, **service_env(info, db_url, state, "uibench",  # type: ignore[arg-type]
                                        POLLER_POLLING_INTERVAL_S=str(interval))}


async def _year_of_hours(db_url: str, cloud_id: str) -> int:
    import asyncpg
    conn = await asyncpg.connect(db_url)
    try:
        device_id = await conn.fetchval("SELECT id FROM devices WHERE cloud_id = $1", cloud_id)
        await conn.execute("SELECT poller_ensure_partitions(current_date - 367, 368)")
        rows = await conn.execute(
            "INSERT INTO readings (device_id, tick_at, device_at, received_at, demand_w) "
            "SELECT $1, t, t, t, 800 + 600 * sin(extract(epoch FROM t) / 86400.0) "
            "FROM generate_series(date_trunc('hour', now()) - interval '365 days', "
            "date_trunc('hour', now()) - interval '2 hours', interval '1 hour') t "
            "ON CONFLICT DO NOTHING", device_id)
        if await conn.fetchval("SELECT to_regclass('readings_1h') IS NOT NULL"):
            # With rollups, a year is answered from the hour level: give it the
            # same hours (the worker only rolls up what the loader marked).
            await conn.execute("SELECT poller_ensure_rollup_partitions(current_date - 367, 368)")
            await conn.execute(
                "INSERT INTO readings_1h (device_id, bucket, readings, demand_n, demand_sum, "
                "demand_min, demand_max, failed) "
                "SELECT device_id, tick_at, 1, 1, demand_w, demand_w, demand_w, 0 "
                "FROM readings WHERE device_id = $1 AND tick_at < date_trunc('hour', now()) "
                "- interval '1 hour' ON CONFLICT DO NOTHING", device_id)
        return int(rows.split()[-1])
    finally:
        await conn.close()


def _timed(page: Page, hash_: str, ready: str) -> float:
    t0 = time.perf_counter()
    page.evaluate("h => { location.hash = h; }", hash_)
    try:
        page.wait_for_function(f"() => {ready}", timeout=30_000)
    except PlaywrightError:
        print(f"{hash_} not ready within 30 s; the page shows:\n{page.inner_text('#page')}")
        raise
    return (time.perf_counter() - t0) * 1000


def fleet(devices: int, interval: float) -> None:
    from poller.stack import EmbeddedStack, create_database
    with tempfile.TemporaryDirectory(prefix="uibench-") as tmp:
        work = Path(tmp)
        stack = EmbeddedStack(work / "stack", progress=print)
        info = stack.up()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            db_url = create_database(info.database_url, "uibench")
            env = _env(info, db_url, work / "state", interval)
            subprocess.run([sys.executable, "-m", "poller", "migrate"], env=env, check=True)
            t0 = time.perf_counter()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "poller", "simulate", "--devices", str(devices),
                 "--register", "--port-file", str(work / "sim.port")], env=env))
            while not (work / "sim.port").exists() or not (work / "sim.port").read_text():
                time.sleep(0.5)
            print(f"registered {devices:,} devices in {time.perf_counter() - t0:.0f} s")
            log = work / "serve.log"
            procs.append(subprocess.Popen([sys.executable, "-m", "poller", "serve"], env=env,
                                          stdout=log.open("wb"), stderr=subprocess.STDOUT))
            while not (m := re.search(r"API on (http://\S+)", log.read_text())):
                time.sleep(0.5)
            base = m.group(1)
            hours = asyncio.run(_year_of_hours(db_url, "f00000"))
            print(f"one year of hourly readings for f00000: {hours:,} rows; API {base}")
            time.sleep(max(5.0, 2 * interval))  # every device polled once at least
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(base + "/ui/")
                page.wait_for_selector("#nav:not([hidden])")
                fleet_ms, device_ms = [], []
                for _ in range(5):
                    page.evaluate("location.hash = '#/archive'")
                    page.wait_for_selector('section[data-page="archive"][aria-busy="false"]')
                    fleet_ms.append(_timed(page, "#/fleet", "document.querySelector("
                        "'section[data-page=fleet][aria-busy=false] [data-table=worst], "
                        "section[data-page=fleet][aria-busy=false] [data-part=worst] p')"))
                    device_ms.append(_timed(page, "#/device/f00000", "document.querySelector("
                        "'section[data-page=device] [data-part=demand]')?.dataset.points"))
                    t0 = time.perf_counter()
                    page.click('button[data-range="1y"]')
                    device_ms[-1] = _timed(page, "#/device/f00000", "document.querySelector("
                                           "'[data-part=demand]').dataset.points >= 8000")
                    device_ms[-1] = (time.perf_counter() - t0) * 1000
                browser.close()
            for path in ("/api/fleet", "/api/event/f00000", "/api/fleet/registered",
                         "/api/devices?state=failing&limit=200", "/api/devices?q=f0001&limit=50"):
                took = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(base + path, timeout=30) as resp:
                        resp.read()
                    took.append((time.perf_counter() - t0) * 1000)
                print(f"GET {path}: median {statistics.median(took):.1f} ms, "
                      f"max {max(took):.1f} ms (50 requests, one at a time)")
            print(f"Fleet page complete ({devices:,} devices): median "
                  f"{statistics.median(fleet_ms):.0f} ms, max {max(fleet_ms):.0f} ms")
            print(f"Device page one-year chart ({hours:,} points): median "
                  f"{statistics.median(device_ms):.0f} ms, max {max(device_ms):.0f} ms")
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(timeout=60)
            stack.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["charts", "fleet"])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--interval", type=float, default=60.0,
                        help="seconds between polls of each device (default 60)")
    args = parser.parse_args()
    if args.what == "charts":
        charts()
    else:
        fleet(args.devices, args.interval)


if __name__ == "__main__":
    main()
