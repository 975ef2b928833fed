"""Prometheus metrics, read from plain counters at scrape time.

The request path only bumps ints in dicts; prometheus-client formats them
when /metrics is asked for.  Each app has its own registry, so tests can run
many apps in one process.
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from gateway.delivery import Worker
    from gateway.spool import Spool

COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Counters:
    """What ingest counts; keys are label tuples."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.accepted: dict[str, int] = {}
        self.deduplicated: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.sdk_metrics = 0
        self.commits = [0] * (len(COMMIT_BUCKETS) + 1)
        self.commit_sum = 0.0
        #: gateway serve --workers: HTTP requests answered by each worker (filled at a scrape)
        self.by_worker: dict[str, int] = {}

    def request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def bump(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def commit(self, seconds: float) -> None:
        self.commits[bisect.bisect_left(COMMIT_BUCKETS, seconds)] += 1
        self.commit_sum += seconds


class GatewayCollector:
    def __init__(self, counters: Counters, spool: "Spool", workers: list["Worker"],
                 worker_restarts: Callable[[], int] | None = None) -> None:
        self.c = counters
        self.spool = spool
        self.workers = workers
        #: gateway serve --workers: how many worker processes were started again
        self.worker_restarts = worker_restarts

    def collect(self) -> Iterator[Metric]:
        c = self.c
        m = CounterMetricFamily("gateway_http_requests", "HTTP requests by endpoint and status",
                                labels=["endpoint", "status"])
        for (ep, st), n in sorted(c.requests.items()):
            m.add_metric([ep, str(st)], n)
        yield m
        m = CounterMetricFamily("gateway_calls_accepted", "Calls stored in the spool", labels=["source"])
        for k, n in sorted(c.accepted.items()):
            m.add_metric([k], n)
        yield m
        m = CounterMetricFamily("gateway_calls_deduplicated", "Calls answered 200 but not stored again: their "
                                "messageId was stored within storage.dedup_window", labels=["source"])
        for k, n in sorted(c.deduplicated.items()):
            m.add_metric([k], n)
        yield m
        m = CounterMetricFamily("gateway_calls_rejected", "Calls not stored, by reason", labels=["reason"])
        for k, n in sorted(c.rejected.items()):
            m.add_metric([k], n)
        yield m
        m = CounterMetricFamily("gateway_calls_dropped", "Calls dropped by source transforms", labels=["reason"])
        for k, n in sorted(c.dropped.items()):
            m.add_metric([k], n)
        yield m
        yield CounterMetricFamily("gateway_sdk_metrics", "POST /v1/m reports received", value=c.sdk_metrics)
        yield GaugeMetricFamily("gateway_spool_calls", "Calls held in the spool", value=self.spool.rows)
        yield GaugeMetricFamily("gateway_spool_bytes", "Bytes of calls held in the spool", value=self.spool.bytes)
        yield GaugeMetricFamily("gateway_spool_max_bytes", "storage.max_bytes", value=self.spool.max_bytes)
        yield GaugeMetricFamily("gateway_spool_free_bytes", "Free bytes on the spool's filesystem (free pages "
                                "of the spool file included)", value=self.spool.free_bytes)
        yield GaugeMetricFamily("gateway_spool_min_free_bytes", "storage.min_free_bytes: below it the spool "
                                "refuses calls", value=self.spool.min_free_bytes)
        yield CounterMetricFamily("gateway_spool_writer_restarts", "Times the spool's writer process died "
                                  "and another was started", value=self.spool.restarts)
        buckets, acc = [], 0
        for bound, n in zip((*COMMIT_BUCKETS, float("inf")), c.commits):
            acc += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        h = HistogramMetricFamily("gateway_spool_commit_seconds", "Spool group-commit latency (fsync included)")
        h.add_metric([], buckets, c.commit_sum)
        yield h
        per = {
            "delivered": CounterMetricFamily("gateway_destination_delivered", "Calls delivered",
                                             labels=["destination"]),
            "retried": CounterMetricFamily("gateway_destination_retried", "Calls scheduled for a retry",
                                           labels=["destination"]),
            "replayed": CounterMetricFamily("gateway_destination_replayed", "Calls queued again by gateway "
                                            "replay or gateway dlq replay, as they came due", labels=["destination"]),
        }
        dead = CounterMetricFamily("gateway_destination_dead_letters", "Calls dead-lettered, by reason",
                                   labels=["destination", "reason"])
        skipped = CounterMetricFamily("gateway_destination_skipped", "Calls not sent: routed away or "
                                      "dropped by a destination transform", labels=["destination", "reason"])
        reqs = CounterMetricFamily("gateway_destination_requests", "Requests to the destination by result",
                                   labels=["destination", "result"])
        backlog = GaugeMetricFamily("gateway_destination_backlog", "Calls not yet read by the destination",
                                    labels=["destination"])
        retry_backlog = GaugeMetricFamily("gateway_destination_retry_backlog", "Calls waiting for a retry",
                                          labels=["destination"])
        oldest = GaugeMetricFamily("gateway_destination_oldest_pending_age_seconds",
                                   "Age of the oldest call not yet delivered", labels=["destination"])
        paused = GaugeMetricFamily("gateway_destination_paused", "1 while the destination is paused "
                                   "(credentials or endpoint refused)", labels=["destination"])
        now = time.time()
        for w in self.workers:
            s = w.stats
            per["delivered"].add_metric([w.name], s.delivered)
            per["retried"].add_metric([w.name], s.retried)
            per["replayed"].add_metric([w.name], s.replayed)
            for k, n in sorted(s.dead.items()):
                dead.add_metric([w.name, k], n)
            for k, n in sorted(s.skipped.items()):
                skipped.add_metric([w.name, k], n)
            for k, n in sorted(s.requests.items()):
                reqs.add_metric([w.name, k], n)
            backlog.add_metric([w.name], s.backlog)
            retry_backlog.add_metric([w.name], s.retry_backlog)
            oldest.add_metric([w.name], max(0.0, now - s.oldest) if s.oldest else 0.0)
            paused.add_metric([w.name], 1 if s.paused else 0)
        yield from per.values()
        yield from (dead, skipped, reqs, backlog, retry_backlog, oldest, paused)
        yield GaugeMetricFamily("gateway_server_workers", "Server processes that answered this scrape "
                                "(gateway serve --workers)", value=len(c.by_worker) or 1)
        if self.worker_restarts is not None:
            m = CounterMetricFamily("gateway_server_worker_requests", "HTTP requests answered, by worker "
                                    "process (0: the first)", labels=["worker"])
            for k, n in sorted(c.by_worker.items()):
                m.add_metric([k], n)
            yield m
            yield CounterMetricFamily("gateway_server_worker_restarts", "Worker processes that died and were "
                                      "started again", value=self.worker_restarts())
        extra = getattr(self.spool, "collect_extra", None)  # a backend's own series (NATS)
        if extra is not None:
            yield from extra()


def registry_for(counters: Counters, spool: "Spool", workers: list["Worker"],
                 worker_restarts: Callable[[], int] | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GatewayCollector(counters, spool, workers, worker_restarts))  # type: ignore[arg-type]
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
