"""The systemd units, the install script and the Prometheus alert rules."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import generate_latest

from poller.api.metrics import make_registry
from poller.check import Thresholds
from poller.config import IngestSettings
from poller.sealing import SecretBox, generate_key
from tests.apiview import FakeFleetView, settings_with

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
UNITS = ("poller.service", "poller@.service")
INSTALLED_BINARY = "/opt/poller/.venv/bin/poller"


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (every value of a repeated key)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify(unit_dir: Path, name: str) -> tuple[int, str]:
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_dir / name)],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def staged(tmp_path: Path, text_of: dict[str, str] | None = None) -> Path:
    """The units copied to ``tmp_path`` with ExecStart pointing at this venv's
    poller: verify checks that the binary exists, and /opt/poller is not here."""
    poller = Path(sys.executable).parent / "poller"
    assert poller.exists(), poller
    for unit in UNITS:
        text = (text_of or {}).get(unit) or (SCRIPTS / unit).read_text()
        (tmp_path / unit).write_text(text.replace(INSTALLED_BINARY, str(poller)))
    return tmp_path


def our_messages(output: str, unit_dir: Path) -> list[str]:
    # The host's own units may be reported too; only lines about ours count.
    return [line for line in output.splitlines()
            if str(unit_dir) in line or "poller" in line]


@pytest.mark.parametrize("name", ["poller.service", "poller@east.service"])
def test_units_verify_clean(tmp_path: Path, name: str) -> None:
    unit_dir = staged(tmp_path)
    code, output = verify(unit_dir, name)
    assert code == 0, output
    assert our_messages(output, unit_dir) == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = (SCRIPTS / "poller.service").read_text().replace("Type=notify", "Type=notifyy")
    unit_dir = staged(tmp_path, {"poller.service": broken})
    _, output = verify(unit_dir, "poller.service")
    assert any("notifyy" in line for line in our_messages(output, unit_dir)), output


def test_units_say_what_the_service_needs() -> None:
    grace = IngestSettings().shutdown_grace_s
    for unit in UNITS:
        s = unit_settings((SCRIPTS / unit).read_text())
        assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
        assert s["WatchdogSec"] == ["30"] and s["Restart"] == ["on-failure"]
        assert int(s["TimeoutStopSec"][0]) > grace
        assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert s["ExecStart"][0].startswith(INSTALLED_BINARY + " serve --config /etc/poller/")
        assert s["User"] == ["poller"] and s["CapabilityBoundingSet"] == [""]
        assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
        assert s["LimitNOFILE"] == ["1048576"]
    template = unit_settings((SCRIPTS / "poller@.service").read_text())
    assert "POLLER_INSTANCE_ID=%i" in template["Environment"]
    assert "POLLER_STATE_DIR=/var/lib/poller/%i" in template["Environment"]
    assert template["ReadWritePaths"] == ["/var/lib/poller/%i"]
    assert template["ExecStart"][0].endswith("--config /etc/poller/%i.toml")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", *args], capture_output=True, text=True, timeout=120)


def test_install_script_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = run_script(str(SCRIPTS / "install-service.sh"), "--root", str(root),
                       "--instance", "east")
    assert first.returncode == 0, first.stderr
    assert "+ create" in first.stdout and "+ install -m 0644" in first.stdout
    env = root / "etc/poller/poller.env"
    assert env.stat().st_mode & 0o777 == 0o600
    assert (root / "etc/poller/east.env").stat().st_mode & 0o777 == 0o600
    assert (root / "var/lib/poller/east").is_dir()
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_text() == (SCRIPTS / unit).read_text()
    env.write_text("POLLER_SECRET_KEY=kept\n")
    second = run_script(str(SCRIPTS / "install-service.sh"), "--root", str(root),
                        "--instance", "east")
    assert second.returncode == 0, second.stderr
    assert "+ create" not in second.stdout and "exists (kept)" in second.stdout
    assert env.read_text() == "POLLER_SECRET_KEY=kept\n"


def test_install_script_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = run_script(str(SCRIPTS / "install-service.sh"), "--dry-run", "--root", str(root))
    assert out.returncode == 0, out.stderr
    assert f"+ install -d -m 0750 {root}/etc/poller" in out.stdout
    assert not root.exists()
    bad = run_script(str(SCRIPTS / "install-service.sh"), "--dry-run", "--instance", "a/b")
    assert bad.returncode == 2 and "bad instance name" in bad.stderr


def test_sysdeps_is_satisfied() -> None:
    out = run_script(str(SCRIPTS / "sysdeps.sh"))
    assert out.returncode == 0, out.stderr
    assert shutil.which("systemd-analyze")
    again = run_script(str(SCRIPTS / "sysdeps.sh"))
    assert "all present" in again.stdout


# -- alert rules -------------------------------------------------------------

def parse_rules(text: str) -> list[dict[str, Any]]:
    """The rules of scripts/alerts.yml: a fixed, indentation-based subset of YAML
    (PyYAML is not a dependency). Fails on anything outside that subset."""
    rules: list[dict[str, Any]] = []
    section: dict[str, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key, sep, value = line.strip().removeprefix("- ").partition(":")
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        assert sep, f"line {number}: not key: value"
        if indent == 6 and line.strip().startswith("- alert:"):
            rules.append({"alert": value})
            section = None
        elif indent == 8:
            assert rules, f"line {number}: outside a rule"
            if value:
                rules[-1][key] = value
                section = None
            else:
                section = rules[-1].setdefault(key, {})
        elif indent == 10:
            assert section is not None, f"line {number}: outside labels/annotations"
            section[key] = value
        else:
            assert (indent, key) in {(0, "groups"), (2, "name"), (4, "rules")}, \
                f"line {number}: unexpected {line!r}"
    return rules


def exposed_metric_names() -> set[str]:
    view = FakeFleetView(settings_with(), SecretBox(generate_key()), cast(Any, None), None)
    text = generate_latest(make_registry(view)).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_alert_rules_are_well_formed_and_use_our_metrics() -> None:
    rules = parse_rules((SCRIPTS / "alerts.yml").read_text())
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 10
    exposed = exposed_metric_names()
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["expr"].count("(") == rule["expr"].count(")")
        for metric in re.findall(r"\bpoller_[a-z_]+", rule["expr"]):
            assert metric in exposed, f"{rule['alert']}: {metric} is not exposed"


def test_alert_thresholds_match_poller_check() -> None:
    rules = {r["alert"]: r["expr"] for r in parse_rules((SCRIPTS / "alerts.yml").read_text())}
    t = Thresholds()
    expected = {
        "PollerPollRateLow": f"< {t.poll_ratio_warn:g}",
        "PollerPollRateCritical": f"< {t.poll_ratio_crit:g}",
        "PollerFailureRatioHigh": f"> {t.failure_ratio_warn:g}",
        "PollerFailureRatioCritical": f"> {t.failure_ratio_crit:g}",
        "PollerIngestLag": f"> {t.ingest_lag_warn_s:g}",
        "PollerIngestLagCritical": f"> {t.ingest_lag_crit_s:g}",
        "PollerUploadBacklog": f"> {t.upload_backlog_warn}",
        "PollerUploadBacklogCritical": f"> {t.upload_backlog_crit}",
    }
    for alert, tail in expected.items():
        assert rules[alert].endswith(tail), (alert, rules[alert])


def test_building_the_pool_collects_once_then_freezes() -> None:
    import gc
    import weakref

    from poller import heap

    class Node:
        pass

    enabled = gc.isenabled()
    gc.enable()
    try:
        with heap.building("a test graph"):
            assert not gc.isenabled()  # no collection walks the graph being built
            a, b = Node(), Node()
            a.other, b.other = b, a  # type: ignore[attr-defined]
            gone = weakref.ref(a)
            kept = Node()
            del a, b
        assert gc.isenabled()
        assert gone() is None  # the cycle was collected, not frozen
        assert gc.get_freeze_count() > 0
        assert all(kept is not o for g in (0, 1, 2) for o in gc.get_objects(generation=g))
    finally:
        gc.unfreeze()
        if not enabled:
            gc.disable()
