"""Print pip constraints pinning every runtime dependency to its declared floor.

    python scripts/minver_constraints.py > constraints.txt
    pip install -c constraints.txt -e '.[embedded]'

pip has no "lowest versions" resolver, so `make test-minver` installs with
these pins and runs a smoke subset: a floor in pyproject.toml that is lower
than what the code needs fails there, not on a user's machine. The pins are
derived from pyproject.toml each time, so a new dependency is covered as soon
as it is declared; one declared without a floor (`>=`) is an error.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS = ("embedded",)
"""Extras installed with the smoke subset (dev tools stay at their latest)."""
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """Distribution name -> the version after its ``>=``."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    found: dict[str, str] = {}
    for text in requirements:
        match = _REQUIREMENT.match(text.split(";")[0])
        if match is None:
            raise SystemExit(f"{pyproject}: cannot read requirement {text!r}")
        name, specs = match.group(1), match.group(2)
        lows = [s.strip()[2:].strip() for s in specs.split(",") if s.strip().startswith(">=")]
        if len(lows) != 1:
            raise SystemExit(f"{pyproject}: {text!r} needs exactly one '>=' floor "
                             "(the lowest version the code is known to work with)")
        found[name] = lows[0]
    return found


def main() -> None:
    sys.stdout.write("".join(f"{name}=={low}\n" for name, low in sorted(floors().items())))


if __name__ == "__main__":
    main()
