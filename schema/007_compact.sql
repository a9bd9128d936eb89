-- Compact raw storage: closed days packed into one row per device and hour.
--
-- FOR EVERY READER OF RAW READINGS (the readings API, rollups, retention):
--   * Once `poller compact` (poller.ingest.compact.compact_day) has run on a
--     day, that day's readings are in packed_readings, not in readings; late
--     readings loaded afterwards are in readings again until the next
--     compaction. A reading is in exactly one of the two, never both.
--   * Read raw rows through readings_all(device_id, from, to) (one device) or
--     readings_span(from, to) (every device): both return the columns of
--     readings, raw and packed alike, ordered by (device_id, tick_at).
--     Reading `readings` directly misses every compacted day.
--   * poller_day_rows(day) counts a day's readings in both forms.
--   * Dropping a day: drop packed_readings_pYYYYMMDD with readings_pYYYYMMDD
--     (poller_drop_day(day) drops both), or its packed rows outlive it and a
--     replay of the day would then hold each reading twice.
--   * Partition names: packed_readings_pYYYYMMDD (they do not match
--     'readings_p%').
--
-- Why this layout (measured by `python -m poller.bench.layouts`, see
-- README "Storage cost and compact layout"): a heap row costs 24 bytes of
-- tuple header, 4 of line pointer and ~40 of primary-key index entry for 64
-- bytes of data; one row per device and hour holds ~600 readings for the
-- same overhead, and its arrays are compressed by TOAST (pglz: the server
-- may lack lz4). Nothing is narrowed: the meters serve totals like
-- 91937.250000 kWh (> 2^24 Wh: float4 would round them), prices like 0.0884
-- and timestamps to the microsecond, so every value stays float8 and every
-- time stays exact to the microsecond.
--
-- Encoding of one packed row (arrays of n elements, in tick order):
--   tick_us[1]    microseconds from hour_at to the first tick,
--   tick_us[i]    microseconds from tick i-1 to tick i (i > 1): deltas, so a
--                 regular schedule is one repeated number and compresses away;
--   device_us[i]  device_at - tick_at in microseconds (NULL element: NULL),
--   received_us[i] received_at - tick_at in microseconds,
--   demand_w, delivered_wh, received_wh, price: the float8 values as loaded.
-- (device_id, hour_at) is the key; (device_id, tick_at) stays unique across
-- readings and packed_readings: compaction moves rows in one transaction, and
-- a BEFORE INSERT trigger on each compacted day's raw partition skips a row
-- whose reading is already packed (a late or replayed row is loaded once).

CREATE TABLE packed_readings (
    device_id    bigint             NOT NULL,
    hour_at      timestamptz        NOT NULL,   -- a UTC hour
    n            integer            NOT NULL CHECK (n > 0),
    tick_us      bigint[]           NOT NULL,
    device_us    bigint[]           NOT NULL,
    received_us  bigint[]           NOT NULL,
    demand_w     double precision[] NOT NULL,
    delivered_wh double precision[] NOT NULL,
    received_wh  double precision[] NOT NULL,
    price        double precision[] NOT NULL,
    PRIMARY KEY (device_id, hour_at),
    CHECK (cardinality(tick_us) = n AND cardinality(device_us) = n
           AND cardinality(received_us) = n AND cardinality(demand_w) = n
           AND cardinality(delivered_wh) = n AND cardinality(received_wh) = n
           AND cardinality(price) = n)
) PARTITION BY RANGE (hour_at);

-- base + us microseconds, exact for any int8 (interval * float8 is exact
-- only below 2^53, so whole hours go through make_interval).
CREATE FUNCTION poller_us_after(base timestamptz, us bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT base + make_interval(hours => (us / 3600000000)::integer)
                + (us % 3600000000) * interval '1 microsecond'
$$;

-- a - b in microseconds, exact (extract returns numeric).
CREATE FUNCTION poller_us_between(a timestamptz, b timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (extract(epoch FROM a - b) * 1000000)::bigint
$$;

-- The readings of one packed row, in tick order.
CREATE FUNCTION poller_unpack(
    p_device_id bigint, p_hour_at timestamptz, p_tick_us bigint[], p_device_us bigint[],
    p_received_us bigint[], p_demand_w double precision[], p_delivered_wh double precision[],
    p_received_wh double precision[], p_price double precision[])
RETURNS TABLE (device_id bigint, tick_at timestamptz, device_at timestamptz,
               received_at timestamptz, demand_w double precision,
               delivered_wh double precision, received_wh double precision,
               price double precision)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_device_id, s.t, poller_us_after(s.t, s.d), poller_us_after(s.t, s.r),
           s.w, s.dl, s.rc, s.p
    FROM (SELECT poller_us_after(p_hour_at, (sum(u.dt) OVER (ORDER BY u.i))::bigint) AS t,
                 u.d, u.r, u.w, u.dl, u.rc, u.p, u.i
          FROM unnest(p_tick_us, p_device_us, p_received_us, p_demand_w, p_delivered_wh,
                      p_received_wh, p_price) WITH ORDINALITY AS u(dt, d, r, w, dl, rc, p, i)
         ) AS s
    ORDER BY s.i
$$;

-- One device's readings with from <= tick_at < to, raw and packed.
CREATE FUNCTION readings_all(p_device_id bigint, p_from timestamptz, p_to timestamptz)
RETURNS SETOF readings
LANGUAGE sql STABLE AS $$
    SELECT * FROM (
        SELECT r.* FROM readings r
        WHERE r.device_id = p_device_id AND r.tick_at >= p_from AND r.tick_at < p_to
        UNION ALL
        SELECT u.* FROM packed_readings p,
            LATERAL poller_unpack(p.device_id, p.hour_at, p.tick_us, p.device_us,
                                  p.received_us, p.demand_w, p.delivered_wh,
                                  p.received_wh, p.price) u
        WHERE p.device_id = p_device_id
          AND p.hour_at >= date_trunc('hour', p_from, 'UTC') AND p.hour_at < p_to
          AND u.tick_at >= p_from AND u.tick_at < p_to
    ) AS a
    ORDER BY a.tick_at
$$;

-- Every device's readings with from <= tick_at < to, raw and packed.
CREATE FUNCTION readings_span(p_from timestamptz, p_to timestamptz)
RETURNS SETOF readings
LANGUAGE sql STABLE AS $$
    SELECT * FROM (
        SELECT r.* FROM readings r WHERE r.tick_at >= p_from AND r.tick_at < p_to
        UNION ALL
        SELECT u.* FROM packed_readings p,
            LATERAL poller_unpack(p.device_id, p.hour_at, p.tick_us, p.device_us,
                                  p.received_us, p.demand_w, p.delivered_wh,
                                  p.received_wh, p.price) u
        WHERE p.hour_at >= date_trunc('hour', p_from, 'UTC') AND p.hour_at < p_to
          AND u.tick_at >= p_from AND u.tick_at < p_to
    ) AS a
    ORDER BY a.device_id, a.tick_at
$$;

-- The packed partition of a UTC day, made when missing; returns its name.
CREATE FUNCTION poller_ensure_packed_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    name text := format('packed_readings_p%s', to_char(day, 'YYYYMMDD'));
BEGIN
    IF to_regclass(name) IS NULL THEN
        PERFORM pg_advisory_xact_lock(7419031);  -- the lock poller_ensure_partitions takes
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF packed_readings FOR VALUES FROM (%L) TO (%L)',
            name, (day::timestamp AT TIME ZONE 'UTC'), ((day + 1)::timestamp AT TIME ZONE 'UTC'));
    END IF;
    RETURN name;
END $$;

-- On a compacted day's raw partition: a row whose reading is packed already
-- is skipped (loaded once), any other goes in as a raw row until the next
-- compaction packs it. Runs only for rows of compacted days: late data.
CREATE FUNCTION poller_packed_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hour timestamptz := date_trunc('hour', NEW.tick_at, 'UTC');
    offset_us bigint := poller_us_between(NEW.tick_at, hour);
BEGIN
    IF EXISTS (
        SELECT 1 FROM packed_readings p,
             LATERAL (SELECT sum(dt) OVER (ORDER BY i) AS at
                      FROM unnest(p.tick_us) WITH ORDINALITY AS u(dt, i)) AS c
        WHERE p.device_id = NEW.device_id AND p.hour_at = hour AND c.at = offset_us
    ) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END $$;

-- A day's readings, raw and packed.
CREATE FUNCTION poller_day_rows(day date) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (SELECT count(*) FROM readings
            WHERE tick_at >= (day::timestamp AT TIME ZONE 'UTC')
              AND tick_at < ((day + 1)::timestamp AT TIME ZONE 'UTC'))
         + (SELECT coalesce(sum(n), 0) FROM packed_readings
            WHERE hour_at >= (day::timestamp AT TIME ZONE 'UTC')
              AND hour_at < ((day + 1)::timestamp AT TIME ZONE 'UTC'))
$$;

-- Drop a day in both forms; returns how many tables went (0, 1 or 2).
CREATE FUNCTION poller_drop_day(day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    dropped integer := 0;
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY[format('readings_p%s', to_char(day, 'YYYYMMDD')),
                                format('packed_readings_p%s', to_char(day, 'YYYYMMDD'))] LOOP
        IF to_regclass(name) IS NOT NULL THEN
            EXECUTE format('DROP TABLE %I', name);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;
