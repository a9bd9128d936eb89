"""The archive: hourly segment files kept in S3, and replay from there."""
