"""Every rollup row against an aggregate of the raw rows, computed here in
Python (not by the SQL under test), for the rollup tests and the e2e suite."""

from __future__ import annotations

import collections
import math
from datetime import UTC, datetime
from typing import Any

import asyncpg

from poller.config import RollupSettings
from poller.rollups.worker import RollupWorker

Key = tuple[int, datetime]
_FLOATS = ("demand_sum",)


def _bucket(at: datetime, size_s: int) -> datetime:
    s = int(at.timestamp() // size_s) * size_s
    return datetime.fromtimestamp(s, UTC)


def expected(raw: list[asyncpg.Record], failures: list[asyncpg.Record],
             size_s: int) -> dict[Key, dict[str, Any]]:
    """The rollup rows of bucket size ``size_s`` the raw rows call for."""
    out: dict[Key, dict[str, Any]] = {}

    def row(key: Key) -> dict[str, Any]:
        r = out.get(key)
        if r is None:
            r = out[key] = {
                "readings": 0, "demand_n": 0, "demand_sum": None, "demand_min": None,
                "demand_max": None, "failed": 0, "price_last": None,
                **{f"{k}_{e}_{x}": None for k in ("delivered", "received")
                   for e in ("first", "last") for x in ("at", "wh")}}
        return r

    for r in sorted(raw, key=lambda r: (r["device_id"], r["tick_at"])):
        x = row((r["device_id"], _bucket(r["tick_at"], size_s)))
        x["readings"] += 1
        d = r["demand_w"]
        if d is not None:
            x["demand_n"] += 1
            x["demand_sum"] = d if x["demand_sum"] is None else x["demand_sum"] + d
            x["demand_min"] = d if x["demand_min"] is None else min(x["demand_min"], d)
            x["demand_max"] = d if x["demand_max"] is None else max(x["demand_max"], d)
        for kind in ("delivered", "received"):
            v = r[f"{kind}_wh"]
            if v is not None:
                if x[f"{kind}_first_at"] is None:
                    x[f"{kind}_first_at"], x[f"{kind}_first_wh"] = r["tick_at"], v
                x[f"{kind}_last_at"], x[f"{kind}_last_wh"] = r["tick_at"], v
        if r["price"] is not None:
            x["price_last"] = r["price"]
    for f in failures:
        row((f["device_id"], _bucket(f["tick_at"], size_s)))["failed"] += 1
    return out


def expected_fleet(raw: list[asyncpg.Record],
                   failures: list[asyncpg.Record]) -> dict[datetime, dict[str, Any]]:
    minutes = expected(raw, [], 60)
    out: dict[datetime, dict[str, Any]] = {}
    for (_, bucket), x in minutes.items():
        f = out.setdefault(bucket, {"total_w": None, "devices": 0, "outcomes": {}})
        f["devices"] += 1
        f["outcomes"]["ok"] = f["outcomes"].get("ok", 0) + 1
        if x["demand_n"]:
            mean = x["demand_sum"] / x["demand_n"]
            f["total_w"] = mean if f["total_w"] is None else f["total_w"] + mean
    seen: dict[datetime, set[tuple[str, int]]] = collections.defaultdict(set)
    for r in failures:
        seen[_bucket(r["tick_at"], 60)].add((r["outcome"], r["device_id"]))
    for bucket, pairs in seen.items():
        f = out.setdefault(bucket, {"total_w": None, "devices": 0, "outcomes": {}})
        for outcome, _ in pairs:
            f["outcomes"][outcome] = f["outcomes"].get(outcome, 0) + 1
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def _compare(name: str, want: dict[Any, dict[str, Any]], got: dict[Any, dict[str, Any]]
             ) -> list[str]:
    problems = []
    for key in sorted(set(want) | set(got)):
        w, g = want.get(key), got.get(key)
        if w is None or g is None:
            problems.append(f"{name} {key}: expected {w}, found {g}")
            continue
        for col, value in w.items():
            if not _same(value, g[col]):
                problems.append(f"{name} {key} {col}: expected {value!r}, found {g[col]!r}")
    return problems


async def assert_rollups_match(db_url: str, *, settle: bool = True) -> int:
    """Recompute every dirty bucket (``settle``), then compare every rollup
    row with the raw rows; return the minute rows compared."""
    import orjson

    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        if settle:
            await RollupWorker(pool, RollupSettings()).settle_all()
        async with pool.acquire() as conn:
            raw = await conn.fetch("SELECT * FROM readings")
            failures = await conn.fetch("SELECT * FROM poll_failures")
            dirty = await conn.fetchval("SELECT count(*) FROM rollup_dirty")
            levels = {}
            for table in ("readings_1m", "readings_1h"):
                rows = await conn.fetch(f"SELECT * FROM {table}")
                levels[table] = {(r["device_id"], r["bucket"]):
                                 {k: v for k, v in r.items() if k not in ("device_id", "bucket")}
                                 for r in rows}
            fleet = {r["bucket"]: {"total_w": r["total_w"], "devices": r["devices"],
                                   "outcomes": orjson.loads(r["outcomes"])}
                     for r in await conn.fetch("SELECT * FROM fleet_1m")}
    finally:
        await pool.close()
    assert dirty == 0
    problems = _compare("minute", expected(raw, failures, 60), levels["readings_1m"])
    problems += _compare("hour", expected(raw, failures, 3600), levels["readings_1h"])
    problems += _compare("fleet", expected_fleet(raw, failures), fleet)
    assert not problems, f"{len(problems)} differences, first: {problems[:5]}"
    return len(levels["readings_1m"])
