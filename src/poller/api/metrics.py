"""Prometheus metrics, read from the service view when scraped.

The hot path counts into plain integers and :class:`LogHistogram`; this
collector turns them into metric families only when ``/metrics`` is asked
for, so polling pays nothing per observation. The registry is private to the
API: nothing else in the process registers into it.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from poller import heap
from poller.api.view import MetricsView
from poller.cluster.membership import Membership
from poller.polling.stats import LogHistogram
from poller.retention.job import RetentionJob

LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GC_PAUSE_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
COMMIT_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _histogram(name: str, doc: str, hist: LogHistogram,
               bounds: tuple[float, ...]) -> HistogramMetricFamily:
    cumulative = hist.cumulative(bounds)
    buckets: list[tuple[str, float]] = [(repr(b), float(n))
                                        for b, n in zip(bounds, cumulative, strict=True)]
    buckets.append(("+Inf", float(hist.count)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.sum)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class ServiceCollector:
    """A custom collector: every sample comes from the view at scrape time."""

    def __init__(self, view: MetricsView) -> None:
        self._view = view

    def describe(self) -> list[Metric]:
        # Empty: no scrape at registration time (the view may not be started).
        return []

    def collect(self) -> Iterator[Metric]:
        view = self._view
        snap = view.fleet()
        polls = CounterMetricFamily("poller_polls", "Completed polls by driver and outcome; a "
                                    "reading kept with a field nulled out of bounds or without "
                                    "its totals counts as ok and also under what it lacks.",
                                    labels=["driver", "outcome"])
        for (driver, outcome), n in sorted(snap.polls_by_driver_outcome.items()):
            polls.add_metric([driver, outcome], n)
        yield polls
        yield _histogram("poller_poll_lateness_seconds",
                         "Actual minus scheduled send time of each poll.",
                         view.lateness(), LATENCY_BUCKETS_S)
        yield _gauge("poller_expected_polls_per_second",
                     "Sum over enabled devices of 1 / interval.", snap.expected_polls_per_s)
        yield CounterMetricFamily("poller_skipped_ticks",
                                  "Ticks skipped because the previous poll overran.",
                                  value=snap.skipped_ticks)
        yield CounterMetricFamily("poller_shed_ticks",
                                  "Ticks not polled because they came due too late "
                                  "(overload; polling.shed_after_s).",
                                  value=snap.shed_ticks)
        yield _gauge("poller_http_connections_open",
                     "Open device connections (eagle drivers' transport).",
                     snap.connections_open)
        yield CounterMetricFamily("poller_http_connections_opened",
                                  "Device connections opened.", value=snap.connections_opened)
        yield CounterMetricFamily("poller_http_connects_deferred",
                                  "Connects put off by polling.max_connects_per_s.",
                                  value=snap.connects_deferred)
        yield CounterMetricFamily("poller_http_timeouts_kept",
                                  "Connections kept open after a missed deadline to read "
                                  "the late answer (polling.keep_after_timeout_s).",
                                  value=snap.timeouts_kept)
        yield CounterMetricFamily("poller_http_requests_refused",
                                  "Requests turned away at once (ticks skipped): every "
                                  "connection to the host busy and its queue full.",
                                  value=snap.requests_refused)
        yield CounterMetricFamily("poller_backpressure_skips",
                                  "Ticks skipped because the ingest buffer was full.",
                                  value=snap.backpressure_skips)
        yield CounterMetricFamily("poller_clock_steps",
                                  "Wall-clock steps the polling schedule was re-anchored after.",
                                  value=snap.clock_steps)
        yield CounterMetricFamily("poller_tick_conflicts",
                                  "Ticks not polled after a backward wall-clock step because "
                                  "a reading of that device and tick exists already.",
                                  value=snap.tick_conflicts)
        yield _gauge("poller_polls_in_flight", "Polls sent and not yet answered.",
                     snap.in_flight)
        yield _gauge("poller_devices_total", "Devices being polled.", snap.devices)
        states = GaugeMetricFamily("poller_devices", "Devices by state.", labels=["state"])
        for state, n in sorted(snap.devices_by_state.items()):
            states.add_metric([state], n)
        yield states
        yield _gauge("poller_buffer_rows", "Readings waiting in memory for COPY.",
                     snap.buffer_rows)
        yield _histogram("poller_copy_batch_seconds", "Seconds per COPY batch into Postgres.",
                         view.copy_latency(), LATENCY_BUCKETS_S)
        yield _histogram("poller_commit_latency_seconds",
                         "Seconds from poll to reading committed in Postgres.",
                         view.commit_latency(), COMMIT_BUCKETS_S)
        yield CounterMetricFamily("poller_rows_committed", "Readings committed to Postgres.",
                                  value=snap.rows_committed)
        yield CounterMetricFamily("poller_rows_quarantined",
                                  "Spool lines the loader could not load (the encoder or "
                                  "Postgres refused them), put in readings_quarantine.",
                                  value=snap.rows_quarantined)
        yield CounterMetricFamily("poller_copy_batches", "COPY batches committed.",
                                  value=snap.copy_batches)
        yield _gauge("poller_ingest_lag_seconds",
                     "Age of the oldest reading not yet committed (0: none).", snap.ingest_lag_s)
        yield _gauge("poller_spool_bytes", "Bytes in the local spool.", snap.spool_bytes)
        yield _gauge("poller_segments_pending_upload", "Closed segments not yet on S3.",
                     snap.segments_pending_upload)
        yield CounterMetricFamily("poller_upload_failures", "Failed segment uploads.",
                                  value=snap.upload_failures)
        yield _gauge("poller_upload_lag_seconds",
                     "Age of the oldest closed segment not yet on S3 (0: none).",
                     snap.upload_lag_s)
        yield _gauge("poller_disk_used_ratio", "Fraction of the spool's disk in use.",
                     snap.disk_used_fraction)
        yield _gauge("poller_spool_ceiling_bytes", "What the spool may hold now "
                     "(ingest.spool_max_bytes, ingest.spool_max_percent).",
                     snap.spool_ceiling_bytes)
        yield _gauge("poller_spool_full", "1 while the spool refuses batches for want of room "
                     "(readings wait in memory; past buffer_max_rows ticks are skipped).",
                     1.0 if snap.spool_full else 0.0)
        yield CounterMetricFamily("poller_spool_errors", "Spool file operations that failed "
                                  "(ENOSPC, EIO, EROFS, ...); the batch is kept and retried.",
                                  value=snap.spool_errors)
        yield CounterMetricFamily("poller_segments_evicted",
                                  "Segments removed from the spool past its high-water mark, "
                                  "verified in S3, before Postgres loaded them.",
                                  value=snap.segments_evicted)
        yield _gauge("poller_segments_awaiting_archive_load",
                     "Evicted segments still to be loaded from S3.",
                     snap.segments_awaiting_archive_load)
        yield CounterMetricFamily("poller_rows_loaded_from_archive",
                                  "Readings loaded into Postgres from S3 (evicted segments).",
                                  value=snap.rows_loaded_from_archive)
        yield CounterMetricFamily("poller_segments_unarchived",
                                  "Segments deleted at the spool's ceiling while S3 failed: "
                                  "loaded into Postgres, missing from the archive.",
                                  value=snap.segments_unarchived)
        up = GaugeMetricFamily("poller_component_up",
                               "1 if the dependency answered its last use.",
                               labels=["component"])
        for name, is_up in (("postgres", snap.postgres_up), ("redis", snap.redis_up),
                            ("s3", snap.s3_up)):
            up.add_metric([name], 1.0 if is_up else 0.0)
        yield up
        yield _gauge("poller_polling", "1 while polling runs.", 1.0 if snap.polling else 0.0)
        restarts = CounterMetricFamily("poller_task_restarts",
                                       "Background tasks restarted after a failure.",
                                       labels=["task"])
        for task, n in sorted(snap.task_restarts.items()):
            restarts.add_metric([task], n)
        yield restarts
        yield _gauge("poller_loop_responsive", "1 if the event loop answered its heartbeat.",
                     1.0 if view.loop_responsive() else 0.0)
        yield _gauge("poller_start_time_seconds", "Unix time the service started.",
                     snap.started_at)
        yield from _gc_families()
        yield from _retention_families(getattr(view, "retention", None))
        yield from _cluster_families(getattr(view, "cluster", None))


def _gc_families() -> Iterator[Metric]:
    watch = heap.pauses()
    if watch is None:
        return
    runs = CounterMetricFamily("poller_gc_collections", "Passes of the cyclic garbage "
                               "collector by generation (2 is a full collection).",
                               labels=["generation"])
    held = CounterMetricFamily("poller_gc_pause_seconds", "Time the cyclic collector held "
                               "the process, by generation.", labels=["generation"])
    for generation in range(3):
        runs.add_metric([str(generation)], watch.collections[generation])
        held.add_metric([str(generation)], watch.seconds[generation])
    yield runs
    yield held
    yield CounterMetricFamily("poller_gc_full_cpu_seconds", "CPU time of the full "
                              "collections (their pauses, less time the process waited "
                              "for a core).", value=watch.full_cpu_s)
    yield _histogram("poller_gc_full_pause_seconds", "Pauses of the full collections: "
                     "every poll due meanwhile waits.", watch.full, GC_PAUSE_BUCKETS_S)


def make_registry(view: MetricsView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(view))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The exposition text of ``registry``."""
    return bytes(generate_latest(registry))


def _retention_families(job: RetentionJob | None) -> Iterator[Metric]:
    """The last daily retention run (absent from a process that runs none)."""
    if job is None:
        return
    blocked = GaugeMetricFamily(
        "poller_retention_blocked_days", "Partitions kept past their level's retention at "
        "the last run, by reason (raw: segment_missing, size_mismatch, not_loaded, "
        "rows_unaccounted, rollups_pending, s3_unavailable, ...).", labels=["level", "reason"])
    report = job.last
    if report is not None:
        for (level, reason), n in sorted(report.blocked().items()):
            blocked.add_metric([level, reason], n)
    yield blocked
    dropped = CounterMetricFamily("poller_retention_dropped_partitions",
                                  "Partitions retention dropped since start, by level.",
                                  labels=["level"])
    for level in ("raw", "minute", "hour"):
        dropped.add_metric([level], job.dropped_total[level])
    yield dropped
    yield CounterMetricFamily("poller_retention_packed_readings", "Raw readings packed into "
                              "one row per device and hour (schema/007) since start.",
                              value=job.compacted_rows)
    yield CounterMetricFamily("poller_retention_run_failures", "Daily retention runs that "
                              "could not reach PostgreSQL (tried again an hour later).",
                              value=job.failures)
    yield _gauge("poller_retention_last_run_timestamp_seconds",
                 "Unix time of the last retention run (0: none yet).",
                 report.at if report is not None else 0.0)



def _cluster_families(membership: Membership | None) -> Iterator[Metric]:
    """Membership gauges and handoff counters (nothing outside a cluster)."""
    if membership is None:
        return
    status = membership.status()
    yield _gauge("poller_cluster_members", "Members in this instance's view of its cluster.",
                 len(status["view"]))
    yield _gauge("poller_cluster_members_missing", "Members seen in the last day that hold "
                 "no lease now (stopped without leaving: kill -9, a lost host).",
                 len(status["missing"]))
    yield _gauge("poller_cluster_lease_valid", "1 while this instance may poll (its lease "
                 "is valid, or the membership store is down and the last view stands).",
                 1.0 if status["lease_valid"] else 0.0)
    yield _gauge("poller_cluster_store_up", "1 if the membership store answered the last "
                 "heartbeat.", 1.0 if status["store_up"] else 0.0)
    for name, doc in (("view_changes", "Views applied (members joined or left)."),
                      ("rejoins", "Times this instance found its lease ended and rejoined."),
                      ("fences", "Times polling was held for want of a valid lease.")):
        yield CounterMetricFamily(f"poller_cluster_{name}", doc, value=status[name])
    handoffs = CounterMetricFamily("poller_cluster_handoffs", "Devices taken over from "
                                   "(in) or given to (out) other members at view changes.",
                                   labels=["direction"])
    handoffs.add_metric(["in"], status["handoffs_in"])
    handoffs.add_metric(["out"], status["handoffs_out"])
    yield handoffs
