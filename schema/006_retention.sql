-- Retention: the archive manifest, and the record of raw days dropped.
--
-- A daily raw partition may leave Postgres only when S3 holds every segment
-- whose rows went into it. The manifest says which segments those are: one
-- row per segment a loader (or a replay) put into readings, with how many
-- bytes of it were loaded (the checkpoint's end offset: for a closed, fully
-- loaded segment, its size, which is the size of its archive object) and how
-- many lines. ingest_checkpoints cannot serve: its rows go when the spool
-- deletes the segment. The manifest's rows stay (a few dozen a day per
-- instance), so a day dropped and replayed can be checked again.
CREATE TABLE archive_manifest (
    instance_id  text        NOT NULL,
    segment      text        NOT NULL,   -- the spool file name, INSTANCE-YYYYMMDDTHH-SEQ.ndjson.gz
    hour_at      timestamptz NOT NULL,   -- the UTC hour of its readings' tick_at
    bytes        bigint      NOT NULL CHECK (bytes >= 0),
    rows         bigint      NOT NULL CHECK (rows >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, segment)
);
CREATE INDEX archive_manifest_hour ON archive_manifest (hour_at);

-- The hour a segment name carries; NULL for anything else.
CREATE FUNCTION poller_segment_hour(segment text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT make_timestamptz(substr(m[1], 1, 4)::int, substr(m[1], 5, 2)::int,
                            substr(m[1], 7, 2)::int, substr(m[1], 10, 2)::int, 0, 0, 'UTC')
    FROM regexp_match(segment, '-([0-9]{8}T[0-9]{2})-[0-9]{6,}\.ndjson\.gz$') AS m
    WHERE m IS NOT NULL
$$;

-- The loader moves a checkpoint in the transaction that loads the rows, so a
-- trigger on the checkpoint records the manifest in that same transaction:
-- no row reaches readings through the loader without its segment listed.
-- (A trigger rather than a statement in the loader: the loader stays as it
-- is, and a loader of an older version writes the manifest all the same.)
CREATE FUNCTION poller_note_manifest() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hour timestamptz := poller_segment_hour(NEW.segment);
BEGIN
    IF hour IS NOT NULL THEN
        INSERT INTO archive_manifest AS m (instance_id, segment, hour_at, bytes, rows)
        VALUES (NEW.instance_id, NEW.segment, hour, NEW.end_offset, NEW.rows)
        ON CONFLICT (instance_id, segment) DO UPDATE
            SET bytes = greatest(m.bytes, EXCLUDED.bytes),
                rows = greatest(m.rows, EXCLUDED.rows), updated_at = now()
            WHERE EXCLUDED.bytes > m.bytes OR EXCLUDED.rows > m.rows;
    END IF;
    RETURN NULL;
END $$;

-- The loader's row lock (an update that changes nothing) does not fire these.
CREATE TRIGGER ingest_checkpoints_manifest_insert AFTER INSERT ON ingest_checkpoints
    FOR EACH ROW WHEN (NEW.end_offset > 0) EXECUTE FUNCTION poller_note_manifest();
CREATE TRIGGER ingest_checkpoints_manifest_update AFTER UPDATE ON ingest_checkpoints
    FOR EACH ROW WHEN (NEW.end_offset > OLD.end_offset OR NEW.rows > OLD.rows)
    EXECUTE FUNCTION poller_note_manifest();

-- What the checkpoints still know (segments the spool has not deleted yet).
-- Rows loaded before this migration from segments deleted since are in no
-- manifest: retention finds them by count and keeps their days.
INSERT INTO archive_manifest (instance_id, segment, hour_at, bytes, rows)
SELECT instance_id, segment, poller_segment_hour(segment), end_offset, rows
FROM ingest_checkpoints
WHERE end_offset > 0 AND poller_segment_hour(segment) IS NOT NULL
ON CONFLICT DO NOTHING;

-- Raw days retention dropped, and when a replay brought one back.
CREATE TABLE retention_dropped (
    day          date        PRIMARY KEY,
    dropped_at   timestamptz NOT NULL DEFAULT now(),
    bytes        bigint      NOT NULL,   -- the partition's size when dropped
    rows         bigint      NOT NULL,   -- its rows when dropped
    segments     integer     NOT NULL,   -- archive objects verified for it
    restored_at  timestamptz             -- the last replay that reloaded it
);
