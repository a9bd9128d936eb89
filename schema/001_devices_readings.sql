-- Devices and their readings.

-- A registered device. Removal keeps the row (readings refer to its id) but
-- wipes the sealed credentials and frees the external id for re-use.
CREATE TABLE devices (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cloud_id       text        NOT NULL CHECK (cloud_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    email          text        NOT NULL,
    driver         text        NOT NULL,
    url            text,
    options        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    sealed_secret  bytea,
    interval_s     real        NOT NULL DEFAULT 6 CHECK (interval_s > 0),
    enabled        boolean     NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    removed_at     timestamptz,
    CHECK (removed_at IS NOT NULL OR sealed_secret IS NOT NULL)
);
CREATE UNIQUE INDEX devices_cloud_id_live ON devices (cloud_id) WHERE removed_at IS NULL;

-- One row per completed poll. (device_id, tick_at) names a poll, so loading
-- a reading twice is a no-op. No foreign key to devices: a per-row check
-- would slow COPY, and readings outlive the registration that made them.
CREATE TABLE readings (
    device_id     bigint           NOT NULL,
    tick_at       timestamptz      NOT NULL,
    device_at     timestamptz,
    received_at   timestamptz      NOT NULL,
    demand_w      double precision,
    delivered_wh  double precision,
    received_wh   double precision,
    price         double precision,
    PRIMARY KEY (device_id, tick_at)
) PARTITION BY RANGE (tick_at);

-- Daily partitions named readings_pYYYYMMDD (UTC days), created ahead by
-- poller at migrate, at serve start, hourly while serving, and on demand by
-- the loader for any day a batch touches.
CREATE FUNCTION poller_ensure_partitions(first_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    made integer := 0;
    name text;
BEGIN
    -- Two loaders creating the same day at once would race on the catalog.
    PERFORM pg_advisory_xact_lock(7419031);
    FOR i IN 0 .. days - 1 LOOP
        d := first_day + i;
        name := format('readings_p%s', to_char(d, 'YYYYMMDD'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                name,
                (d::timestamp AT TIME ZONE 'UTC'),
                ((d + 1)::timestamp AT TIME ZONE 'UTC'));
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END $$;

SELECT poller_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, 4);
