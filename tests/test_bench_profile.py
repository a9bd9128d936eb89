"""The bench's profile: py-spy against a real busy process, and its summary."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from poller.bench.profile import OTHER, Recorder, render, summarize

COLLAPSED = """\
<module> (poller/__main__.py:3);Runner.run (asyncio/runners.py:118);TimingWheel._run \
(poller/wheel.py:69);DeviceLoop.fire (poller/polling/loop.py:134) 30
<module> (poller/__main__.py:3);Runner.run (asyncio/runners.py:118);\
HttpConnection.data_received (poller/transport/connection.py:188);\
parse_demand (poller/drivers/eagle_cloud.py:185) 50
<module> (poller/__main__.py:3);Runner.run (asyncio/runners.py:118);\
HttpConnection.data_received (poller/transport/connection.py:188);\
parse_demand (poller/drivers/eagle_cloud.py:186) 10
<module> (poller/__main__.py:3);Runner.run (asyncio/runners.py:118) 10
not a sample line
"""


def test_summary_by_area_and_function() -> None:
    samples, areas, top = summarize(COLLAPSED, top=2)
    assert samples == 100
    assert areas == [("responses: HTTP, driver, reading", 60.0), ("ticks and sends", 30.0),
                     (OTHER, 10.0)]
    # Lines of one function are one row.
    assert top == [("parse_demand (drivers/eagle_cloud.py)", 60.0),
                   ("DeviceLoop.fire (polling/loop.py)", 30.0)]
    assert summarize("") == (0, [], [])


SPINNER = """
import time
def spin_for_the_profiler(until):
    n = 0
    while time.monotonic() < until:
        n += 1
spin_for_the_profiler(time.monotonic() + 20)
"""


def test_recorder_samples_a_real_process(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", SPINNER])
    try:
        time.sleep(0.3)
        profile = Recorder(child.pid, 1.0, tmp_path / "stacks.txt", rate_hz=200).finish()
    finally:
        child.kill()
        child.wait()
    assert profile.available, profile.reason
    assert profile.samples > 50
    assert profile.top_self[0][0].startswith("spin_for_the_profiler")
    assert profile.top_self[0][1] > 80.0
    text = "\n".join(render(profile))
    assert "spin_for_the_profiler" in text and str(tmp_path) in text


def test_recorder_names_a_missing_process(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    profile = Recorder(child.pid, 1.0, tmp_path / "stacks.txt").finish()
    assert not profile.available
    assert profile.reason and profile.reason.startswith("py-spy failed")
