# -*- test-case-name: tests.test_admin -*-
"""
Prometheus metrics, in a registry of the daemon's own (not the process-wide
default, so that two daemons in one test process do not collide).

What the funnel already counts for C{/stats} (events stored, in flight,
rejected, the journal backlog) is read from it at scrape time by
L{FunnelCollector} rather than counted twice on the hot path; only what
nothing else keeps (answers by status, latency histograms) is recorded per
request, through label children looked up once and cached.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Tuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from mixingest import __version__
from mixingest.httpsite import HardenedSite, IngestChannel, IngestRequest
from mixingest.journal.writer import FSYNC_BUCKETS

if TYPE_CHECKING:
    from mixingest.funnel import Funnel

__all__ = ["FunnelCollector", "Metrics", "PublicSite", "SiteCollector"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""
Seconds.  Few buckets, because observing walks them; from a millisecond (an
answer without a write) to the queue write timeouts.
"""

_ENDPOINTS = {
    path: name
    for name in ("track", "engage", "groups", "import")
    for path in (f"/{name}".encode(), f"/{name}/".encode())
}


class Metrics:
    """
    The daemon's metrics and its registry.  Reactor-owned.
    """

    def __init__(self) -> None:
        # Counters' *_created series double every counter for nothing an
        # alert uses (the process start time says when they began).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "mixingest_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "mixingest_request_duration_seconds",
            "Seconds from a request's arrival (whole) to its answer, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._writes = Histogram(
            "mixingest_queue_write_duration_seconds",
            "Seconds a batch took to be stored (or to fail), by queue.",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._early = Counter(
            "mixingest_early_refusals",
            "Public requests answered before a handler (400 malformed, 408 too slow, "
            "414/431 too long), by status code.",
            ["code"],
            registry=self.registry,
        )
        build = GaugeMetricFamily(
            "mixingest_build_info",
            "Always 1; the version and the Python running it are labels.",
            labels=["version", "python"],
        )
        python = platform.python_implementation() + " " + platform.python_version()
        build.add_metric([__version__, python], 1)
        self.registry.register(_Constant([build]))
        ProcessCollector(registry=self.registry)
        self._answers: Dict[str, Dict[int, Any]] = {}
        self._latencies: Dict[str, Any] = {}
        self._writeLatencies: Dict[str, Any] = {}

    def answered(self, path: bytes, code: int, seconds: float) -> None:
        """
        Count one answer to a request for C{path}, which took C{seconds}.
        """
        endpoint = _ENDPOINTS.get(path, "other")
        answers = self._answers.get(endpoint)
        if answers is None:
            answers = self._answers[endpoint] = {}
            self._latencies[endpoint] = self._latency.labels(endpoint)
        counter = answers.get(code)
        if counter is None:
            counter = answers[code] = self._requests.labels(endpoint, str(code))
        counter.inc()
        self._latencies[endpoint].observe(seconds)

    def wrote(self, queue: str, seconds: float) -> None:
        """
        Observe one queue write that took C{seconds}.
        """
        histogram = self._writeLatencies.get(queue)
        if histogram is None:
            histogram = self._writeLatencies[queue] = self._writes.labels(queue)
        histogram.observe(seconds)

    def refusedEarly(self, code: int) -> None:
        """
        Count one public request answered C{code} before any handler.
        """
        self._early.labels(str(code)).inc()

    def exposition(self, accept: Optional[str]) -> Tuple[bytes, str]:
        """
        Everything in the registry, in the format the scraper's C{Accept}
        header asks for (Prometheus text or OpenMetrics).

        @return: the body and its content type.
        """
        encoder, contentType = choose_encoder(accept or "")
        return encoder(self.registry), contentType


class FunnelCollector:
    """
    The funnel's own figures as metric families, computed at scrape time.
    """

    def __init__(self, funnel: Funnel) -> None:
        self.funnel = funnel

    def collect(self) -> Iterator[Metric]:
        funnel = self.funnel
        stored = CounterMetricFamily(
            "mixingest_events_stored", "Events stored, by queue.", labels=["queue"]
        )
        storedBytes = CounterMetricFamily(
            "mixingest_bytes_stored", "Bytes of events stored, by queue.", labels=["queue"]
        )
        failed = CounterMetricFamily(
            "mixingest_events_failed",
            "Events whose queue write failed (answered 5xx), by queue.",
            labels=["queue"],
        )
        inFlight = GaugeMetricFamily(
            "mixingest_events_in_flight",
            "Events handed to a queue and not yet stored.",
            labels=["queue"],
        )
        inFlightBytes = GaugeMetricFamily(
            "mixingest_bytes_in_flight",
            "Bytes handed to a queue and not yet stored.",
            labels=["queue"],
        )
        for name, counts in sorted(funnel.queues.items()):
            stored.add_metric([name], counts.storedEvents)
            storedBytes.add_metric([name], counts.storedBytes)
            failed.add_metric([name], counts.failedEvents)
            inFlight.add_metric([name], counts.events)
            inFlightBytes.add_metric([name], counts.bytes)
        yield from (stored, storedBytes, failed, inFlight, inFlightBytes)
        rejected = CounterMetricFamily(
            "mixingest_events_rejected",
            "Events refused, by reason (rate_limit, global_rate_limit, unknown_token, "
            "in_flight, backlog, draining).",
            labels=["reason"],
        )
        for reason, count in sorted(funnel.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily(
            "mixingest_dedupe_hits",
            "Events answered without storing: already stored.",
            value=funnel.recent.hits,
        )
        yield GaugeMetricFamily(
            "mixingest_dedupe_entries",
            "(token, $insert_id) pairs remembered.",
            value=len(funnel.recent),
        )
        yield GaugeMetricFamily(
            "mixingest_tokens_tracked",
            "Project tokens with per-token counters.",
            value=len(funnel.counters),
        )
        yield GaugeMetricFamily(
            "mixingest_journal_backlog_events",
            "Events in the journal waiting to be forwarded to the remote queue.",
            value=funnel.backlog,
        )
        yield GaugeMetricFamily(
            "mixingest_ready", "1 when /readyz answers 200.", value=int(funnel.ready())
        )
        yield GaugeMetricFamily(
            "mixingest_draining", "1 while a graceful stop drains.", value=int(funnel.draining)
        )
        yield from storageMetrics(funnel.queue.status())


def storageMetrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    """
    The journal's and the forwarder's figures, from the queue backend's
    C{status()}: a journal's own, or a store-and-forward queue's, which
    holds its journal's under C{"journal"}.
    """
    journal = status.get("journal", status)
    if journal.get("backend") == "journal":
        yield GaugeMetricFamily(
            "mixingest_journal_bytes", "Bytes of journal segments.", value=journal["bytes"]
        )
        yield GaugeMetricFamily(
            "mixingest_journal_max_bytes",
            "The journal's bound (--max-journal-bytes): past it, events get 503.",
            value=journal["maxBytes"],
        )
        yield GaugeMetricFamily(
            "mixingest_journal_full",
            "1 while the journal is over its bound and refuses events.",
            value=int(journal["full"]),
        )
        writers = journal.get("queues", {}).values()
        yield CounterMetricFamily(
            "mixingest_journal_possibly_lost",
            "Acknowledged records whose fsync failed (--fsync interval): possibly lost "
            "if the machine crashed.",
            value=sum(w.get("possiblyLost", 0) for w in writers),
        )
        yield from writerMetrics(journal.get("queues", {}))
        yield from groupMetrics(journal)
    forwarder = status.get("forwarder")
    if forwarder is not None:
        yield CounterMetricFamily(
            "mixingest_forwarder_checkpoint_failures",
            "Forwarder checkpoint writes that failed (retried; nothing is resent).",
            value=forwarder["checkpointFailures"],
        )
        yield CounterMetricFamily(
            "mixingest_forwarder_in_doubt_skipped",
            "Journaled copies of in-doubt puts skipped because the remote had stored them.",
            value=forwarder["skippedInDoubt"],
        )
        yield from forwardingMetrics(status)


def writerMetrics(writers: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    """
    Each journal queue's writer: its files, health and fsync latency.
    """
    size = GaugeMetricFamily(
        "mixingest_journal_queue_bytes", "Bytes of a queue's journal segments.", labels=["queue"]
    )
    segments = GaugeMetricFamily(
        "mixingest_journal_queue_segments", "A queue's journal segment files.", labels=["queue"]
    )
    healthy = GaugeMetricFamily(
        "mixingest_journal_writer_healthy",
        "1 while a queue's journal writer can write (0 after a write or fsync failed, "
        "until a retry succeeds).",
        labels=["queue"],
    )
    failures = CounterMetricFamily(
        "mixingest_journal_fsync_failures", "Journal fsyncs that failed.", labels=["queue"]
    )
    fsync = HistogramMetricFamily(
        "mixingest_journal_fsync_duration_seconds",
        "Seconds each journal segment fsync took, failed ones included.",
        labels=["queue"],
    )
    for name, writer in sorted(writers.items()):
        size.add_metric([name], writer["bytes"])
        segments.add_metric([name], writer["segments"])
        healthy.add_metric([name], int(writer["healthy"]))
        failures.add_metric([name], writer["fsyncFailures"])
        counts = writer.get("fsyncBuckets")
        if counts is not None:
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, FSYNC_BUCKETS), "+Inf"), counts):
                cumulative += count
                buckets.append((bound, cumulative))
            fsync.add_metric([name], buckets, writer["fsyncSecondsTotal"])
    yield from (size, segments, healthy, failures, fsync)


def forwardingMetrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    """
    A store-and-forward queue's backlog per queue, its totals and whether
    the remote server is up.
    """
    backlog = GaugeMetricFamily(
        "mixingest_forwarding_backlog_events",
        "Events journaled and not yet forwarded to the remote queue, by queue.",
        labels=["queue"],
    )
    diverted = GaugeMetricFamily(
        "mixingest_forwarding_diverted",
        "1 while a queue's events go to the journal instead of the remote queue.",
        labels=["queue"],
    )
    divertedQueues = set(status.get("diverted", ()))
    for name, count in sorted(status.get("backlog", {}).items()):
        backlog.add_metric([name], count)
        diverted.add_metric([name], int(name in divertedQueues))
    yield from (backlog, diverted)
    forwarder = status["forwarder"]
    for key, family in (
        (
            "forwarded",
            CounterMetricFamily(
                "mixingest_forwarding_forwarded_events",
                "Journaled events forwarded to the remote queue, by queue.",
                labels=["queue"],
            ),
        ),
        (
            "failed",
            CounterMetricFamily(
                "mixingest_forwarding_failed_events",
                "Events in forwarding attempts the remote refused or did not answer, by "
                "queue (they stay journaled; counted again at each retry).",
                labels=["queue"],
            ),
        ),
        (
            "journaled",
            CounterMetricFamily(
                "mixingest_forwarding_journaled_events",
                "Events journaled instead of put to the remote (it failed, or the queue "
                "was diverted), by queue.",
                labels=["queue"],
            ),
        ),
        (
            "lagSeconds",
            GaugeMetricFamily(
                "mixingest_forwarding_lag_seconds",
                "Age of the oldest event waiting in the journal to be forwarded, by queue "
                "(0 when none waits).",
                labels=["queue"],
            ),
        ),
    ):
        for name, figures in sorted(forwarder.get("queues", {}).items()):
            family.add_metric([name], figures[key])
        yield family
    yield GaugeMetricFamily(
        "mixingest_forwarding_consecutive_failures",
        "Forwarding attempts that failed since the last success (0 when forwarding works).",
        value=forwarder["failures"],
    )
    yield GaugeMetricFamily(
        "mixingest_remote_up",
        "1 while the remote queue server (Redis, Kestrel) takes writes.",
        value=int(bool(status.get("remote", {}).get("healthy"))),
    )


class _Constant:
    """
    A collector of fixed families (the build info).
    """

    def __init__(self, families: List[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


_GROUP_GAUGES = (
    ("nextSeq", "mixingest_journal_group_next_seq", "The next sequence number the group reads."),
    ("lagItems", "mixingest_journal_group_lag_items", "Items after the group's cursor."),
    (
        "lagSeconds",
        "mixingest_journal_group_lag_seconds",
        "Age of the segment holding the group's next item (0 when caught up).",
    ),
    (
        "lastCommit",
        "mixingest_journal_group_last_commit_timestamp_seconds",
        "When the group last committed (or sent a heartbeat).",
    ),
)


def groupMetrics(journal: Mapping[str, Any]) -> Iterator[Metric]:
    """
    Each consumer group's cursor and lag (labels C{queue} and C{group}), and
    what retention did, from a journal's C{status()}.
    """
    groups = [
        (queue, group, figures)
        for queue, byGroup in sorted(journal.get("groups", {}).items())
        for group, figures in sorted(byGroup.items())
    ]
    for key, name, documentation in _GROUP_GAUGES:
        family = GaugeMetricFamily(name, documentation, labels=["queue", "group"])
        for queue, group, figures in groups:
            if figures.get(key) is not None:
                family.add_metric([queue, group], figures[key])
        yield family
    retention = journal.get("retention")
    if retention is not None:
        yield CounterMetricFamily(
            "mixingest_journal_retention_dropped_segments",
            "Segments deleted unread by some group (--retention-policy drop).",
            value=retention["droppedSegments"],
        )
        yield CounterMetricFamily(
            "mixingest_journal_retention_dropped_bytes",
            "Bytes of those segments.",
            value=retention["droppedBytes"],
        )
        yield CounterMetricFamily(
            "mixingest_journal_groups_expired",
            "Consumer group cursors deleted by --group-expiry.",
            value=retention["expiredGroups"],
        )
        yield GaugeMetricFamily(
            "mixingest_journal_retention_refusing",
            "Queues refusing events past a retention limit (--retention-policy refuse).",
            value=len(retention["refusing"]),
        )


class SiteCollector:
    """
    The public site's connections and request-body budget, at scrape time.
    """

    def __init__(self, site: HardenedSite) -> None:
        self.site = site

    def collect(self) -> Iterator[Metric]:
        site = self.site
        budget = site.budget
        yield GaugeMetricFamily(
            "mixingest_connections_open", "Open public connections.", value=site.openConnections
        )
        yield GaugeMetricFamily(
            "mixingest_connections_limit",
            "Open public connections past which new ones get 503 (--max-connections).",
            value=site.maxConnections,
        )
        yield CounterMetricFamily(
            "mixingest_connections_refused",
            "Public connections refused (503) past --max-connections.",
            value=site.refusedConnections,
        )
        yield GaugeMetricFamily(
            "mixingest_body_bytes_buffered",
            "Bytes of request bodies being received or handled, all connections together.",
            value=budget.used,
        )
        yield GaugeMetricFamily(
            "mixingest_body_bytes_limit",
            "Bytes of request bodies held at most (--max-buffered-bytes).",
            value=budget.limit,
        )
        yield CounterMetricFamily(
            "mixingest_bodies_refused",
            "Request bodies refused (503) because the body budget was full.",
            value=budget.refused,
        )


class MeteredRequest(IngestRequest):
    """
    A request that notes when it arrived whole, for the latency histogram.
    """

    started = 0.0

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.started = self.channel.site.clock.seconds()  # type: ignore[attr-defined]
        super().requestReceived(command, path, version)


class MeteredChannel(IngestChannel):
    """
    A public channel that counts the requests it refuses before a handler,
    which twisted.web never logs.
    """

    def _answer(self, status: int, reason: str) -> None:
        self.site.metrics.refusedEarly(status)
        super()._answer(status, reason)


class PublicSite(HardenedSite):
    """
    The public site, counting every answer and its latency in L{Metrics}.

    twisted.web calls C{log} once for every finished request, so that is
    where the answer's status is known without touching the handlers.
    """

    requestFactory = MeteredRequest
    protocol = MeteredChannel

    def __init__(self, *args: Any, metrics: Metrics, clock: IReactorTime, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics
        self.clock = clock
        metrics.registry.register(SiteCollector(self))

    def log(self, request: Request) -> None:  # type: ignore[override]
        started: float = request.started  # type: ignore[attr-defined]
        self.metrics.answered(request.path, request.code, self.clock.seconds() - started)
        super().log(request)
