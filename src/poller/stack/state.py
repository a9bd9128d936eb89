"""The stack's record on disk (`stack.json`): which pids, ports and URLs are ours."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "stack.json"
_VERSION = 1


@dataclass
class ComponentRecord:
    """What one started component left behind: its process, ports and URL."""

    pid: int | None = None
    start_ticks: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    url: str | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ComponentRecord:
        return cls(
            pid=raw.get("pid"),
            start_ticks=raw.get("start_ticks"),
            ports={str(k): int(v) for k, v in raw.get("ports", {}).items()},
            url=raw.get("url"),
        )


@dataclass
class StackState:
    """All component records of one state directory."""

    components: dict[str, ComponentRecord] = field(default_factory=dict)

    def record(self, name: str) -> ComponentRecord:
        return self.components.setdefault(name, ComponentRecord())


def load_state(state_dir: Path) -> StackState:
    """Read `stack.json`, or an empty state if there is none yet."""
    path = state_dir / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return StackState()
    if raw.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported stack state version {raw.get('version')!r}")
    return StackState(
        {name: ComponentRecord.from_json(rec) for name, rec in raw["components"].items()}
    )


def save_state(state_dir: Path, state: StackState) -> None:
    """Write `stack.json` atomically so a crash never leaves half a record."""
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    body = {
        "version": _VERSION,
        "components": {name: asdict(rec) for name, rec in state.components.items()},
    }
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
