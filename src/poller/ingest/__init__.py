"""Ingest without loss: the durable local spool and the idempotent Postgres loader."""
