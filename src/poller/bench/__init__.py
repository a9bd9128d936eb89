"""``poller bench``: measure a real run (throughput, lateness, CPU, memory).

A benchmark, not a test: it prints targets next to the measurements and never
fails on them. :func:`poller.bench.run.run_bench` is the CLI entry.
"""
