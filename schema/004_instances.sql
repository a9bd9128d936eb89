-- Who runs each instance id. A running serve holds a session advisory lock
-- keyed on its instance id (see poller.db.instance_lock_key) and writes its
-- row here once it has the lock, so that a second serve with the same id can
-- name the holder in its refusal. backend_pid ties the row to the session
-- holding the lock: a row whose backend no longer holds it is stale.
CREATE TABLE poller_instances (
    instance_id  text        PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    started_at   timestamptz NOT NULL,
    backend_pid  integer     NOT NULL,
    locked_at    timestamptz NOT NULL DEFAULT now()
);
