"""Prometheus metrics in the text exposition format, written by hand (no client library needed).

Counters and histograms are kept under one lock; requests update them from the event loop and from worker
threads. Routes are labelled by their template (``/images/{image_id:path}``), never by the raw path, so a
client cannot blow up the number of series.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .asgi import HTTPMiddleware, ResponseWatch

# Seconds: from a cached-features re-rank (~1 ms) to a slow image encode on a busy CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNMATCHED = "<unmatched>"
INF = 'le="+Inf"'


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    """A labelled histogram: cumulative buckets, sum and count per label tuple."""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...], buckets=LATENCY_BUCKETS) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, label_names, tuple(buckets)
        self.series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        row = self.series.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                row[i] += 1
        row[-2] += value
        row[-1] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, row in sorted(self.series.items()):
            for bound, count in zip(self.buckets, row, strict=False):
                le = f'le="{_number(float(bound))}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {count}")
            lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, INF)} {row[-1]}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(row[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {row[-1]}")
        return lines


class Metrics:
    """All of the service's own metrics; ``render(gauges)`` adds the point-in-time gauges of the caller."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.reloads: dict[str, int] = defaultdict(int)
        self.request_seconds = Histogram(
            "hat_request_duration_seconds", "Time to answer an HTTP request, by route.", ("route",)
        )
        self.stage_seconds = Histogram(
            "hat_search_stage_duration_seconds", "Time spent in each stage of a search.", ("search", "stage")
        )
        self.batch_sizes = Histogram(
            "hat_search_batch_size", "Queries per batch run together (dynamic batching).", ("search",), BATCH_BUCKETS
        )

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, method, str(status))] += 1
            self.request_seconds.observe((route,), seconds)

    def error(self, route: str, code: str) -> None:
        with self.lock:
            self.errors[(route, code)] += 1

    def stages(self, search: str, timings_ms: dict[str, float]) -> None:
        with self.lock:
            for stage, ms in timings_ms.items():
                self.stage_seconds.observe((search, stage), ms / 1000.0)

    def batch(self, search: str, size: int) -> None:
        with self.lock:
            self.batch_sizes.observe((search,), size)

    def reload(self, result: str) -> None:
        with self.lock:
            self.reloads[result] += 1

    def render(self, gauges: list[tuple[str, str, dict[str, str], float]]) -> str:
        """Exposition text; ``gauges`` are ``(name, help, labels, value)`` computed by the caller now."""
        with self.lock:
            lines = _counter(
                "hat_http_requests_total",
                "HTTP requests answered, by route, method and status.",
                ("route", "method", "status"),
                self.requests,
            )
            lines += _counter(
                "hat_http_errors_total", "Error responses, by route and error code.", ("route", "code"), self.errors
            )
            lines += _counter(
                "hat_index_reloads_total",
                "Index reload attempts, by result.",
                ("result",),
                {(k,): v for k, v in self.reloads.items()},
            )
            lines += self.request_seconds.render() + self.stage_seconds.render() + self.batch_sizes.render()
        seen = set()
        for name, help_text, labels, value in gauges:
            if name not in seen:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
                seen.add(name)
            lines.append(f"{name}{_labels(labels.keys(), labels.values())} {_number(value)}")
        return "\n".join(lines) + "\n"


def _counter(name: str, help_text: str, label_names: tuple[str, ...], values: dict) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    lines += [f"{name}{_labels(label_names, k)} {v}" for k, v in sorted(values.items())]
    return lines


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
