"""Rollups: per-minute and per-hour aggregates of the raw readings, kept
equal to them by a worker driven by dirty-bucket marks (see schema/005)."""
