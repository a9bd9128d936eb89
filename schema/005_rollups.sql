-- Rollups: per device per minute and per hour, per fleet per minute, and the
-- failed polls they count.
--
-- A rollup bucket is a pure function of the raw rows of its range: the
-- rollup worker (poller.rollups.worker) recomputes a whole minute from
-- readings and poll_failures, an hour from its sixty minute rows, and
-- upserts the result, so recomputing a bucket again changes nothing and a
-- reading loaded twice (a replay, a lost checkpoint) is counted once, as it
-- is stored once. Which buckets need recomputing is recorded in
-- rollup_dirty, in the same transaction that inserts their raw rows (the
-- loader's, or the failure writer's): a bucket without a mark equals the
-- aggregate over its raw rows (TimescaleDB's invalidation log, in small).

-- One row per poll that ended without a reading (a timeout, a refused
-- connection, an HTTP or device error, rejected credentials, an answer that
-- did not parse). (device_id, tick_at) names the poll, as in readings: a
-- tick has a reading or a failure, never both. Written by the ingest
-- pipeline from the polling loops; not in the archive (see README).
CREATE TABLE poll_failures (
    device_id  bigint      NOT NULL,
    tick_at    timestamptz NOT NULL,
    outcome    text        NOT NULL,  -- an Outcome value: 'timeout', 'connect_error', ...
    failed_at  timestamptz NOT NULL,  -- when the poller gave the poll up
    PRIMARY KEY (device_id, tick_at)
) PARTITION BY RANGE (tick_at);

-- Buckets whose raw rows changed since the worker last recomputed them.
-- level 'minute': readings or poll_failures of that minute were inserted;
-- level 'hour': a minute of that hour was recomputed. Writers upsert with
-- DO UPDATE (not DO NOTHING) so that they lock the mark: a worker deleting
-- it waits for their commit, then sees their rows.
CREATE TABLE rollup_dirty (
    level      text        NOT NULL CHECK (level IN ('minute', 'hour')),
    bucket     timestamptz NOT NULL,
    marked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (level, bucket)
);

-- Per device per minute (and, same columns, per hour). readings counts the
-- raw rows, demand_n those with a demand; mean demand is demand_sum /
-- demand_n. The first and last meter totals of the bucket come with their
-- tick times, so the energy between two buckets' totals is exact. price_last
-- is the price of the last reading that had one. failed counts poll_failures.
CREATE TABLE readings_1m (
    device_id           bigint           NOT NULL,
    bucket              timestamptz      NOT NULL,
    readings            integer          NOT NULL,
    demand_n            integer          NOT NULL,
    demand_sum          double precision,
    demand_min          double precision,
    demand_max          double precision,
    delivered_first_at  timestamptz,
    delivered_first_wh  double precision,
    delivered_last_at   timestamptz,
    delivered_last_wh   double precision,
    received_first_at   timestamptz,
    received_first_wh   double precision,
    received_last_at    timestamptz,
    received_last_wh    double precision,
    price_last          double precision,
    failed              integer          NOT NULL,
    PRIMARY KEY (device_id, bucket)
) PARTITION BY RANGE (bucket);

CREATE TABLE readings_1h (LIKE readings_1m INCLUDING ALL) PARTITION BY RANGE (bucket);

-- Per fleet per minute: total_w is the sum over devices of each one's mean
-- demand in the minute; devices counts those with a reading; outcomes maps
-- each outcome to the devices with at least one poll of it in the minute
-- ('ok': a reading), so a device that failed once and then answered counts
-- under both.
CREATE TABLE fleet_1m (
    bucket    timestamptz      PRIMARY KEY,
    total_w   double precision,
    devices   integer          NOT NULL,
    outcomes  jsonb            NOT NULL
);

-- The worker reads a minute (or an hour) of every device: a BRIN index on
-- time finds it without the (device_id, ...) primary key. Rows arrive in
-- roughly time order, which is what BRIN needs; it costs a few pages a
-- partition and next to nothing per insert.
CREATE INDEX readings_tick_brin ON readings USING brin (tick_at);
CREATE INDEX poll_failures_tick_brin ON poll_failures USING brin (tick_at);
CREATE INDEX readings_1m_bucket_brin ON readings_1m USING brin (bucket);

-- Partitions: poll_failures_pYYYYMMDD and readings_1m_pYYYYMMDD by UTC day,
-- readings_1h_pYYYYMM by UTC month (a year's chart of one device then plans
-- over twelve partitions, not 365). Made ahead at migrate and by the
-- partition keeper, and on demand by their writers.
CREATE FUNCTION poller_ensure_rollup_partitions(first_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    m date;
    made integer := 0;
    name text;
BEGIN
    PERFORM pg_advisory_xact_lock(7419032);
    FOR i IN 0 .. days - 1 LOOP
        d := first_day + i;
        FOREACH name IN ARRAY ARRAY['poll_failures', 'readings_1m'] LOOP
            IF to_regclass(format('%s_p%s', name, to_char(d, 'YYYYMMDD'))) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    format('%s_p%s', name, to_char(d, 'YYYYMMDD')), name,
                    (d::timestamp AT TIME ZONE 'UTC'),
                    ((d + 1)::timestamp AT TIME ZONE 'UTC'));
                made := made + 1;
            END IF;
        END LOOP;
        m := date_trunc('month', d)::date;
        IF to_regclass(format('readings_1h_p%s', to_char(m, 'YYYYMM'))) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF readings_1h FOR VALUES FROM (%L) TO (%L)',
                format('readings_1h_p%s', to_char(m, 'YYYYMM')),
                (m::timestamp AT TIME ZONE 'UTC'),
                ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END $$;

SELECT poller_ensure_rollup_partitions((now() AT TIME ZONE 'UTC')::date - 1, 4);
