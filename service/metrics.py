"""Prometheus metrics, kept and written by ``prometheus_client`` in the text exposition format 0.0.4.

Each app has its own ``CollectorRegistry`` (never the process-wide default one), so several apps in one process
(the tests) count apart. Counters and histograms are thread-safe; requests update them from the event loop and
from worker threads. Routes are labelled by their template (``/images/{image_id:path}``), never by the raw
path, so a client cannot blow up the number of series. The ``_created`` samples prometheus_client adds to
counters and histograms are left out: the exposition is the one the service always had.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from .asgi import HTTPMiddleware, ResponseWatch

# Seconds: from a cached-features re-rank (~1 ms) to a slow image encode on a busy CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNMATCHED = "<unmatched>"


class _Families(Collector):
    """The families of ``metrics`` without their ``_created`` samples (when they were first used: noise here)."""

    def __init__(self, metrics: Iterable[Collector]) -> None:
        self.metrics = tuple(metrics)

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


class _Gauges(Collector):
    """Point-in-time gauges ``(name, help, labels, value)``, one family per name."""

    def __init__(self, gauges: list[tuple[str, str, dict[str, str], float]]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, help_text, labels, value in self.gauges:
            if name not in families:
                families[name] = GaugeMetricFamily(name, help_text, labels=list(labels))
            families[name].add_metric(list(labels.values()), value)
        yield from families.values()


class Metrics:
    """All of the service's own metrics; ``render(gauges)`` adds the point-in-time gauges of the caller."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.http_requests = Counter(
            "hat_http_requests", "HTTP requests answered, by route, method and status.",
            ("route", "method", "status"), registry=None,
        )  # fmt: skip
        self.http_errors = Counter(
            "hat_http_errors", "Error responses, by route and error code.", ("route", "code"), registry=None
        )
        self.reloads = Counter("hat_index_reloads", "Index reload attempts, by result.", ("result",), registry=None)
        self.request_seconds = Histogram(
            "hat_request_duration_seconds", "Time to answer an HTTP request, by route.", ("route",),
            buckets=LATENCY_BUCKETS, registry=None,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "hat_search_stage_duration_seconds", "Time spent in each stage of a search.", ("search", "stage"),
            buckets=LATENCY_BUCKETS, registry=None,
        )  # fmt: skip
        self.batch_sizes = Histogram(
            "hat_search_batch_size", "Queries per batch run together (dynamic batching).", ("search",),
            buckets=BATCH_BUCKETS, registry=None,
        )  # fmt: skip
        owned = (
            self.http_requests, self.http_errors, self.reloads, self.request_seconds, self.stage_seconds,
            self.batch_sizes,
        )  # fmt: skip
        self.registry.register(_Families(owned))

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def error(self, route: str, code: str) -> None:
        self.http_errors.labels(route, code).inc()

    def stages(self, search: str, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_seconds.labels(search, stage).observe(ms / 1000.0)

    def batch(self, search: str, size: int) -> None:
        self.batch_sizes.labels(search).observe(size)

    def reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """Responses counted so far: ``(route, method, status) -> n``."""
        return {
            (s.labels["route"], s.labels["method"], s.labels["status"]): int(s.value)
            for family in self.http_requests.collect()
            for s in family.samples
            if s.name.endswith("_total")
        }

    def render(self, gauges: list[tuple[str, str, dict[str, str], float]]) -> str:
        """Exposition text; ``gauges`` are ``(name, help, labels, value)`` computed by the caller now."""
        now = CollectorRegistry(auto_describe=False)
        now.register(_Gauges(gauges))
        return (generate_latest(self.registry) + generate_latest(now)).decode("utf-8")


class MetricsMiddleware(HTTPMiddleware):
    """Pure ASGI middleware: counts every HTTP response by route template, method and status, with latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        watch = ResponseWatch(send)
        try:
            await self.app(scope, receive, watch)
        finally:
            status = watch.status or 500
            self.metrics.request(route_label(scope), scope["method"], status, time.perf_counter() - start)


def route_label(scope: Scope) -> str:
    """The matched route's path template, or ``<unmatched>``."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED
