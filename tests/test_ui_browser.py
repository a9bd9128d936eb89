"""The dashboard in a real browser: Debian's chromium driven by Playwright,
against a real ``poller serve`` polling the simulator (1 s intervals).

One serve and one browser for the module; a fresh browser context (no
sessionStorage) per test. Set ``UI_SCREENSHOT_DIR`` to keep the
screenshots somewhere (the README's come from ``docs/ui``); by default they
go to the test's temporary directory.

Endpoints other helpers add (``/api/fleet/demand``, ``/api/archive``, the
readings' ``level``) are read from the server's OpenAPI document: while they
are absent the pages must say "Not available", and these tests check that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests import servicefix
from tests.stackfix import RunningStack, fresh_database_url

CHROMIUM = "/usr/bin/chromium"

ADMIN = "admin-" + "a1" * 12
READER = "read-" + "b2" * 12
DEVICES = 12
INTERVAL_S = 1.0
START_S = 60.0


@dataclass
class Dash:
    base: str
    log: Path
    shots: Path
    served: set[str] = field(default_factory=set)

    def get(self, path: str, token: str | None = ADMIN) -> Any:
        req = urllib.request.Request(self.base + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


def _wait_file(path: Path, proc: subprocess.Popen[bytes], what: str) -> str:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        assert proc.poll() is None, f"{what} exited"
        time.sleep(0.1)
    raise AssertionError(f"{what} did not start within {START_S:g} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def dash(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    work = tmp_path_factory.mktemp("ui")
    env = {**os.environ, **servicefix.service_env(
        stack.info, fresh_database_url(stack.info), work / "state", "ui",
        POLLER_API_ADMIN_TOKEN=ADMIN, POLLER_API_READ_TOKEN=READER,
        POLLER_POLLING_INTERVAL_S=str(INTERVAL_S), POLLER_POLLING_TIMEOUT_S="0.8")}
    done = subprocess.run([sys.executable, "-m", "poller", "migrate"], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    port_file = work / "sim.port"
    sim = subprocess.Popen([sys.executable, "-m", "poller", "simulate", "--devices",
                            str(DEVICES), "--register", "--port-file", str(port_file),
                            "--fault", "http_5xx=0.05", "--fault", "auth=0.02"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = work / "serve.log"
    serve: subprocess.Popen[bytes] | None = None
    try:
        _wait_file(port_file, sim, "the simulator")
        with log.open("wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "poller", "serve"], env=env,
                                     stdout=out, stderr=subprocess.STDOUT)
        text = ""
        deadline = time.monotonic() + START_S
        while not (found := re.search(r"API on http://127\.0\.0\.1:(\d+)", text)):
            assert serve.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(0.1)
            text = log.read_text()
        shots = Path(os.environ.get("UI_SCREENSHOT_DIR") or work / "shots")
        shots.mkdir(parents=True, exist_ok=True)
        d = Dash(f"http://127.0.0.1:{found.group(1)}", log, shots)
        d.served = set(d.get("/api/openapi.json")["paths"])
        # Two intervals of readings, so that every device has a latest one.
        deadline = time.monotonic() + 20
        while d.get("/api/fleet")["rows_committed"] < DEVICES * 2:
            assert time.monotonic() < deadline, "serve stores no readings"
            time.sleep(0.2)
        yield d
    finally:
        if serve is not None:
            _stop(serve)
        _stop(sim)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which(CHROMIUM), "chromium is missing: run scripts/sysdeps.sh"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Tab:
    page: Page
    errors: list[str]


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []

    def console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            errors.append(f"{msg.type}: {msg.text} ({msg.location.get('url')})")

    page.on("console", console)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    try:
        yield Tab(page, errors)
    finally:
        context.close()


def sign_in(tab: Tab, dash: Dash, token: str) -> None:
    tab.page.goto(dash.base + "/")
    tab.page.wait_for_selector("#token", state="visible")
    tab.page.fill("#token", token)
    tab.page.press("#token", "Enter")
    tab.page.wait_for_selector("#nav:not([hidden])")


def open_page(tab: Tab, hash_: str) -> None:
    tab.page.evaluate("h => { location.hash = h; }", hash_)
    tab.page.wait_for_selector(f'section[data-page="{hash_.split("/")[1].split("?")[0]}"]'
                               '[aria-busy="false"]')


def some_device(dash: Dash) -> str:
    ok = dash.get("/api/devices?state=ok&limit=1")["devices"]
    assert ok, "no device in state ok"
    return str(ok[0]["cloud_id"])


# -- serving -----------------------------------------------------------------

def test_root_redirects_and_files_carry_a_strict_policy(dash: Dash) -> None:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as moved:
        opener.open(dash.base + "/", timeout=10)
    assert moved.value.code == 302 and moved.value.headers["Location"] == "/ui/"
    for path in ("/ui/", "/ui/app.js", "/ui/vendor/uPlot.esm.js"):
        with urllib.request.urlopen(dash.base + path, timeout=10) as resp:
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            body = resp.read()
            assert body
    html = urllib.request.urlopen(dash.base + "/ui/", timeout=10).read().decode()
    assert "<script>" not in html and " style=" not in html  # no inline script or style
    for path in ("/ui/nothing.js", "/ui/../pyproject.toml", "/ui/%2e%2e/config.py"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(dash.base + path, timeout=10)
        assert missing.value.code == 404, path


def test_devices_api_searches_filters_and_orders_on_the_server(dash: Dash) -> None:
    ids = [d["cloud_id"] for d in dash.get("/api/devices?limit=1000")["devices"]]
    assert len(ids) == DEVICES
    one = ids[3]
    found = dash.get(f"/api/devices?q={one.upper()}")["devices"]
    assert [d["cloud_id"] for d in found] == [one]
    desc = dash.get("/api/devices?order=desc&limit=5")
    assert [d["cloud_id"] for d in desc["devices"]] == ids[::-1][:5]
    rest = dash.get(f"/api/devices?order=desc&limit=100&after={desc['next_after']}")
    assert [d["cloud_id"] for d in rest["devices"]] == ids[::-1][5:]
    assert dash.get("/api/devices?driver=http-json")["devices"] == []
    assert len(dash.get("/api/devices?driver=eagle-cloud&q=%25")["devices"]) == 0  # literal %
    for bad in ("order=up", "driver=nope", "state=ok&order=desc", "q="):
        with pytest.raises(urllib.error.HTTPError) as refused:
            dash.get(f"/api/devices?{bad}")
        assert refused.value.code == 400, bad


# -- pages -------------------------------------------------------------------

def test_every_page_renders_without_console_errors(dash: Dash, tab: Tab) -> None:
    sign_in(tab, dash, ADMIN)
    cid = some_device(dash)
    for name, hash_ in (("fleet", "#/fleet"), ("devices", "#/devices"),
                        ("device", f"#/device/{cid}"), ("archive", "#/archive")):
        open_page(tab, hash_)
        section = tab.page.locator(f'section[data-page="{name}"]')
        assert section.locator("h1").inner_text().strip()
        assert not section.locator(".error").count(), section.inner_text()
        tab.page.screenshot(path=str(dash.shots / f"{name}.png"), full_page=True)
    # What is not served yet says so instead of breaking.
    if "/api/archive" not in dash.served:
        assert tab.page.locator('[data-na="archive status"]').count() == 1
    assert tab.errors == []


def _differences(doc: dict[str, Any], fields: list[Any]) -> list[str]:
    """The shown fields whose value is not ``doc``'s (an /api/fleet answer)."""
    wrong = []
    for name, value, text in fields:
        if name.startswith("registered."):
            continue
        if name == "polls_per_s.total":
            if value != pytest.approx(sum(doc["polls_per_s"].values())):
                wrong.append(name)
            continue
        found: Any = doc
        for part in name.split("."):
            found = found.get(part, 0) if isinstance(found, dict) else found
        if value != found:
            wrong.append(f"{name}: shown {value!r}, answered {found!r}")
        elif isinstance(value, int) and not text.endswith("B") and f"{value:,}" not in text:
            wrong.append(f"{name}: text {text!r}")  # bytes show in KiB, MiB
    return wrong


def test_fleet_numbers_equal_the_fleet_api(dash: Dash, tab: Tab) -> None:
    sign_in(tab, dash, READER)
    # The page refreshes every few seconds: what it shows is one of the
    # answers it was given, each field of the same answer.
    replies: list[Any] = []
    tab.page.on("response", lambda r: replies.append(r)
                if r.url.endswith("/api/fleet") and r.ok else None)
    worst_replies: list[Any] = []
    tab.page.on("response", lambda r: worst_replies.append(r)
                if "/api/fleet/failing?" in r.url and r.ok else None)
    with tab.page.expect_response(lambda r: r.url.endswith("/api/fleet")) as answer:
        open_page(tab, "#/fleet")
    shown_doc = answer.value.json()
    tab.page.wait_for_selector('[data-field="devices"]')
    fields = tab.page.eval_on_selector_all(
        "[data-field][data-value]", "els => els.map(e => [e.dataset.field, "
        "JSON.parse(e.dataset.value), e.textContent])")
    assert len(fields) >= 15
    assert {"lateness_window_p50_s", "lateness_window_p99_s"} <= {n for n, _, _ in fields}
    answers = [r.json() for r in replies]
    assert answers
    # The most-failing table is one of the server's rankings, in its order.
    tab.page.wait_for_selector('[data-part="worst"] table, [data-part="worst"] p')
    listed = tab.page.eval_on_selector_all('[data-table="worst"] tbody tr td:first-child',
                                           "els => els.map(e => e.textContent)")
    rankings = [[d["cloud_id"] for d in r.json()["devices"]] for r in worst_replies]
    assert rankings and listed in rankings, (listed, rankings)
    assert any(not _differences(doc, fields) for doc in answers), \
        [_differences(doc, fields) for doc in answers]
    # And what the page got is what the API says (the fleet does not change size).
    now = dash.get("/api/fleet", READER)
    assert shown_doc["devices"] == now["devices"] == DEVICES
    assert sum(shown_doc["devices_by_state"].values()) == DEVICES
    assert shown_doc["instance_id"] == now["instance_id"] == "ui"
    registered = dash.get("/api/fleet/registered", READER)
    assert tab.page.get_attribute('[data-field="registered.registered"]', "data-value") == \
        str(registered["registered"])
    if "/api/fleet/demand" not in dash.served:
        assert tab.page.locator('[data-na="fleet demand"]').count() == 1
    assert tab.errors == []


def test_device_chart_points_equal_the_readings_api(dash: Dash, tab: Tab) -> None:
    sign_in(tab, dash, READER)
    cid = some_device(dash)
    open_page(tab, f"#/device/{cid}")
    for rng in ("1h", "1d"):
        tab.page.click(f'button[data-range="{rng}"]')
        tab.page.wait_for_function(
            "r => document.querySelector(`button[data-range='${r}']`)"
            ".getAttribute('aria-pressed') === 'true' && "
            "document.querySelector('[data-part=demand]').dataset.src", arg=rng)
        src, xs, avg = tab.page.eval_on_selector(
            '[data-part="demand"]', "el => [el.dataset.src, el.uplot.data[0], el.uplot.data[1]]")
        api = dash.get(src, READER)
        assert len(api["points"]) > 0
        assert xs == [_unix(p["t"]) for p in api["points"]]
        assert avg == pytest.approx([p["avg"] for p in api["points"]])
        if "level" in api:
            assert tab.page.get_attribute('[data-part="demand"]', "data-level") == api["level"]
    assert tab.errors == []


def _unix(iso: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(iso).timestamp()


def test_live_reading_changes_within_two_intervals(dash: Dash, tab: Tab) -> None:
    sign_in(tab, dash, READER)
    open_page(tab, f"#/device/{some_device(dash)}")
    first = tab.page.get_attribute('[data-field="live-demand"]', "data-tick")
    assert first is not None
    started = time.monotonic()
    tab.page.wait_for_function(
        "t => document.querySelector('[data-field=live-demand]')?.dataset.tick !== t",
        arg=first, timeout=2 * INTERVAL_S * 1000 + 500)
    took = time.monotonic() - started
    later = tab.page.get_attribute('[data-field="live-demand"]', "data-tick")
    assert later is not None and float(later) > float(first), (first, later, took)


def test_a_wrong_token_is_refused(dash: Dash, tab: Tab) -> None:
    tab.page.goto(dash.base + "/ui/")
    tab.page.fill("#token", "not-the-token")
    tab.page.press("#token", "Enter")
    tab.page.wait_for_function("() => document.querySelector('#login-error').textContent !== ''")
    assert "not valid" in tab.page.inner_text("#login-error")
    assert tab.page.is_hidden("#nav") and tab.page.locator("section[data-page]").count() == 0
    assert tab.page.evaluate("sessionStorage.length") == 0
    assert "not-the-token" not in tab.page.url
    # The refusal is the one expected console line (the browser logs a 401).
    assert all("401" in e and "/api/session" in e for e in tab.errors), tab.errors


def test_a_read_token_sees_no_admin_controls(dash: Dash, tab: Tab) -> None:
    sign_in(tab, dash, READER)
    assert tab.page.inner_text("#who") == "read only"
    open_page(tab, f"#/device/{some_device(dash)}")
    assert tab.page.locator('[data-part="registration"]').count() == 1
    assert tab.page.locator('[data-part="admin"], [data-action]').count() == 0
    assert tab.page.evaluate("sessionStorage.getItem('poller.token')") == READER
    assert READER not in tab.page.url
    assert tab.errors == []


def test_admin_changes_the_interval_only_after_confirming(dash: Dash, tab: Tab) -> None:
    sign_in(tab, dash, ADMIN)
    ids = [d["cloud_id"] for d in dash.get("/api/devices?limit=100")["devices"]]
    cid = ids[-1]
    open_page(tab, f"#/device/{cid}")
    tab.page.fill("#interval", "2.5")
    tab.page.click("text=Change interval")
    tab.page.click('[data-confirm="no"]')
    tab.page.wait_for_selector('[data-field="admin-message"]:has-text("cancelled")')
    assert dash.get(f"/api/devices/{cid}")["interval_s"] == INTERVAL_S
    tab.page.fill("#interval", "2.5")
    tab.page.click("text=Change interval")
    tab.page.screenshot(path=str(dash.shots / "confirm.png"))
    tab.page.click('[data-confirm="yes"]')
    tab.page.wait_for_selector('[data-field="admin-message"]:has-text("done")')
    assert dash.get(f"/api/devices/{cid}")["interval_s"] == 2.5
    assert dash.get(f"/api/devices/{cid}", READER)["interval_s"] == 2.5
    assert tab.errors == []


FOCUSABLE = ("a[href], button:not([disabled]), input:not([disabled]), "
             "select:not([disabled]), [tabindex]:not([tabindex='-1'])")


def test_keyboard_reaches_every_control(dash: Dash, tab: Tab) -> None:
    sign_in(tab, dash, ADMIN)
    for hash_ in ("#/fleet", "#/devices", f"#/device/{some_device(dash)}", "#/archive"):
        open_page(tab, hash_)
        # Every visible control gets an id-like key; Tab must visit them all.
        want = tab.page.eval_on_selector_all(
            FOCUSABLE, "els => els.filter(e => e.offsetParent !== null)"
            ".map((e, i) => (e.dataset.k = String(i)))")
        assert want, hash_
        tab.page.evaluate("document.activeElement && document.activeElement.blur()")
        seen: set[str] = set()
        for _ in range(len(want) + 5):
            tab.page.keyboard.press("Tab")
            key = tab.page.evaluate("document.activeElement?.dataset?.k ?? null")
            if key is not None:
                seen.add(key)
        assert set(want) <= seen, (hash_, sorted(set(want) - seen, key=int))
    assert tab.errors == []
