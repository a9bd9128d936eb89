-- Ingest checkpoints: how far the loader got in each spool segment.
--
-- A member of a segment is loaded into readings in the same transaction that
-- moves end_offset past it, so a member is either loaded and counted here or
-- not at all. Catch-up after an outage or a restart resumes at end_offset.
CREATE TABLE ingest_checkpoints (
    instance_id  text        NOT NULL,
    segment      text        NOT NULL,
    end_offset   bigint      NOT NULL CHECK (end_offset >= 0),
    rows         bigint      NOT NULL CHECK (rows >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, segment)
);
