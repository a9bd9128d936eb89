-- Quarantined readings: spool lines the loader could not put in readings.
--
-- A line lands here when the COPY encoder cannot take it (a timestamp outside
-- 0001..9999, a value that is not a finite number, a line that is not a
-- reading) or PostgreSQL refuses it (a constraint, a partition that cannot be
-- made), with the line as written and the reason. It is inserted in the
-- transaction that moves its segment's checkpoint past it, so each reading of a
-- loaded member is in readings or here, exactly once. The key is where the
-- line came from: the segment (as named in the spool and, by its archive key,
-- on S3) and its 1-based line in the segment's decompressed NDJSON, so a
-- member loaded again, or the archived segment replayed, adds nothing.
CREATE TABLE readings_quarantine (
    instance_id    text        NOT NULL,
    segment        text        NOT NULL,
    line           bigint      NOT NULL CHECK (line > 0),
    device_id      bigint,                -- when the line has one that fits
    tick_at        timestamptz,           -- when the line has one within 0001..9999
    raw            text        NOT NULL,  -- the line as written (cut past 16,384 characters)
    reason         text        NOT NULL,  -- e.g. 'device_at 1.8e+19 is outside ...'
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, segment, line)
);
