"""The SQL of the rollups: dirty marks, and the aggregate of one bucket.

A bucket's rollup is recomputed whole from the level below (raw rows for a
minute, minute rows for an hour) and upserted, never incremented: doing it
twice gives the same row, so late data, a replay or a duplicate load can only
mark a bucket dirty, never make it wrong. First and last values use
``min/max(ARRAY[epoch, value])``: one pass, in C, where ``array_agg(... ORDER
BY ...)`` sorts each group.
"""

from __future__ import annotations

MINUTE_S = 60
HOUR_S = 3600

MARK_MINUTES = """
INSERT INTO rollup_dirty AS d (level, bucket)
SELECT 'minute', to_timestamp(m * 60) FROM unnest($1::bigint[]) AS m
ON CONFLICT (level, bucket) DO UPDATE SET marked_at = now()"""
"""Mark the minutes ``$1`` (Unix minutes) dirty. DO UPDATE, not DO NOTHING:
the row lock makes a worker deleting the mark wait for this transaction."""

TAKE = """
DELETE FROM rollup_dirty
WHERE (level, bucket) IN (
    SELECT level, bucket FROM rollup_dirty
    WHERE level = $1 AND bucket < $2
    ORDER BY bucket LIMIT $3
    FOR UPDATE SKIP LOCKED)
RETURNING bucket"""
"""Take (delete) up to ``$3`` marks of level ``$1`` for buckets starting
before ``$2``, oldest first. The caller's transaction recomputes them: if it
fails, the marks come back with the rollback."""

PENDING = "SELECT level, count(*) AS n, min(bucket) AS oldest FROM rollup_dirty GROUP BY level"

_FIRST = "min(ARRAY[extract(epoch FROM {t})::float8, {v}]) FILTER (WHERE {v} IS NOT NULL)"
_LAST = "max(ARRAY[extract(epoch FROM {t})::float8, {v}]) FILTER (WHERE {v} IS NOT NULL)"

_COLUMNS = """device_id, bucket, readings, demand_n, demand_sum, demand_min, demand_max,
    delivered_first_at, delivered_first_wh, delivered_last_at, delivered_last_wh,
    received_first_at, received_first_wh, received_last_at, received_last_wh,
    price_last, failed"""
_UPDATE = ", ".join(
    f"{c} = EXCLUDED.{c}" for c in (
        "readings", "demand_n", "demand_sum", "demand_min", "demand_max",
        "delivered_first_at", "delivered_first_wh", "delivered_last_at", "delivered_last_wh",
        "received_first_at", "received_first_wh", "received_last_at", "received_last_wh",
        "price_last", "failed"))


def minute_from_raw(source: str) -> str:
    """Recompute the device rows of the minutes ``$1`` (timestamptz[]) from
    ``source``: ``readings`` or, for a day that was compacted, the storage
    layer's ``readings_span(from, to)`` (raw and packed rows alike)."""
    return f"""
WITH m AS (SELECT unnest($1::timestamptz[]) AS b),
r AS (
    SELECT r.device_id, m.b AS bucket, count(*) AS readings,
           count(r.demand_w) AS demand_n, sum(r.demand_w) AS demand_sum,
           min(r.demand_w) AS demand_min, max(r.demand_w) AS demand_max,
           min(r.tick_at) FILTER (WHERE r.delivered_wh IS NOT NULL) AS df_at,
           {_FIRST.format(t="r.tick_at", v="r.delivered_wh")} AS df,
           max(r.tick_at) FILTER (WHERE r.delivered_wh IS NOT NULL) AS dl_at,
           {_LAST.format(t="r.tick_at", v="r.delivered_wh")} AS dl,
           min(r.tick_at) FILTER (WHERE r.received_wh IS NOT NULL) AS rf_at,
           {_FIRST.format(t="r.tick_at", v="r.received_wh")} AS rf,
           max(r.tick_at) FILTER (WHERE r.received_wh IS NOT NULL) AS rl_at,
           {_LAST.format(t="r.tick_at", v="r.received_wh")} AS rl,
           {_LAST.format(t="r.tick_at", v="r.price")} AS pl
    FROM m, LATERAL (SELECT * FROM {source.format(lo="m.b", hi="m.b + interval '1 minute'")}) r
    GROUP BY r.device_id, m.b),
f AS (
    SELECT f.device_id, m.b AS bucket, count(*) AS failed
    FROM m JOIN poll_failures f ON f.tick_at >= m.b AND f.tick_at < m.b + interval '1 minute'
    GROUP BY f.device_id, m.b)
INSERT INTO readings_1m ({_COLUMNS})
SELECT coalesce(r.device_id, f.device_id), coalesce(r.bucket, f.bucket),
       coalesce(r.readings, 0), coalesce(r.demand_n, 0), r.demand_sum, r.demand_min,
       r.demand_max, r.df_at, r.df[2], r.dl_at, r.dl[2], r.rf_at, r.rf[2], r.rl_at, r.rl[2],
       r.pl[2], coalesce(f.failed, 0)
FROM r FULL JOIN f ON f.device_id = r.device_id AND f.bucket = r.bucket
ON CONFLICT (device_id, bucket) DO UPDATE SET {_UPDATE}"""


RAW_SOURCE = "readings WHERE tick_at >= {lo} AND tick_at < {hi}"
SPAN_SOURCE = "readings_span({lo}, {hi})"

FLEET_MINUTE = """
WITH m AS (SELECT unnest($1::timestamptz[]) AS b),
d AS (
    SELECT m.b AS bucket,
           sum(x.demand_sum / x.demand_n) FILTER (WHERE x.demand_n > 0) AS total_w,
           count(*) FILTER (WHERE x.readings > 0) AS devices
    FROM m JOIN readings_1m x ON x.bucket = m.b
    GROUP BY m.b),
o AS (
    SELECT bucket, jsonb_object_agg(outcome, n) AS outcomes FROM (
        SELECT m.b AS bucket, 'ok' AS outcome, count(*) AS n
        FROM m JOIN readings_1m x ON x.bucket = m.b AND x.readings > 0
        GROUP BY m.b
        UNION ALL
        SELECT m.b, f.outcome, count(DISTINCT f.device_id)
        FROM m JOIN poll_failures f ON f.tick_at >= m.b AND f.tick_at < m.b + interval '1 minute'
        GROUP BY m.b, f.outcome) AS c
    GROUP BY bucket)
INSERT INTO fleet_1m (bucket, total_w, devices, outcomes)
SELECT d.bucket, d.total_w, d.devices, coalesce(o.outcomes, '{}'::jsonb)
FROM d LEFT JOIN o ON o.bucket = d.bucket
ON CONFLICT (bucket) DO UPDATE
    SET total_w = EXCLUDED.total_w, devices = EXCLUDED.devices, outcomes = EXCLUDED.outcomes"""
"""Recompute the fleet rows of the minutes ``$1`` from their device rows
(which hold every device with a reading or a failure in the minute) and the
failures' outcomes."""

MARK_HOURS = """
INSERT INTO rollup_dirty AS d (level, bucket)
SELECT DISTINCT 'hour', date_trunc('hour', b, 'UTC') FROM unnest($1::timestamptz[]) AS b
ON CONFLICT (level, bucket) DO UPDATE SET marked_at = now()"""

HOUR_FROM_MINUTES = f"""
WITH h AS (SELECT unnest($1::timestamptz[]) AS b)
INSERT INTO readings_1h ({_COLUMNS})
SELECT x.device_id, h.b, sum(x.readings), sum(x.demand_n), sum(x.demand_sum),
       min(x.demand_min), max(x.demand_max),
       min(x.delivered_first_at),
       ({_FIRST.format(t="x.delivered_first_at", v="x.delivered_first_wh")})[2],
       max(x.delivered_last_at),
       ({_LAST.format(t="x.delivered_last_at", v="x.delivered_last_wh")})[2],
       min(x.received_first_at),
       ({_FIRST.format(t="x.received_first_at", v="x.received_first_wh")})[2],
       max(x.received_last_at),
       ({_LAST.format(t="x.received_last_at", v="x.received_last_wh")})[2],
       ({_LAST.format(t="x.bucket", v="x.price_last")})[2],
       sum(x.failed)
FROM h JOIN readings_1m x ON x.bucket >= h.b AND x.bucket < h.b + interval '1 hour'
GROUP BY x.device_id, h.b
ON CONFLICT (device_id, bucket) DO UPDATE SET {_UPDATE}"""
"""Recompute the device rows of the hours ``$1`` from their minute rows."""

ENSURE_PARTITIONS = "SELECT poller_ensure_rollup_partitions($1::date, $2::integer)"
