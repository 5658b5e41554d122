"""What the service's Prometheus metrics cost: bookkeeping per search request, and one ``/metrics`` scrape.

Per request, the middleware's ``request()`` plus the search's ``stages()`` with four stages, over six routes;
per scrape, ``render()`` with the engine's gauges once a hundred error series exist. ``--module FILE`` measures
another implementation of ``service/metrics.py`` (for instance the hand-written exposition it replaced:
``git show 29dff38:service/metrics.py > /tmp/metrics_old.py``).

    python benchmarks/metrics_cost.py [--module FILE] [--requests 20000] [--runs 5]

Prints the median over the runs of microseconds per request and per scrape, and the scrape's size.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROUTES = ("/search/text", "/search/image", "/healthz", "/readyz", "/images/{image_id:path}", "/metrics")
GAUGES = [
    ("hat_ready", "1 when the model and an index are loaded.", {}, 1.0),
    ("hat_model_info", "The loaded model.", {"identity": "a" * 64}, 1.0),
    ("hat_index_images", "Images in the serving index.", {}, 40.0),
    ("hat_index_info", "The serving index version.", {"version": "v-20261203T071250220450Z-5a5c4a"}, 1.0),
]


def load(path: str | None):
    """``service.metrics``, or the module in ``path`` loaded in its place."""
    if path is None:
        import service.metrics

        return service.metrics
    import service.asgi  # the module loaded below imports it relatively

    spec = importlib.util.spec_from_file_location("service._measured_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", help="a metrics.py to measure instead of service/metrics.py")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    metrics = load(args.module).Metrics()

    def per_request() -> float:
        start = time.perf_counter()
        for i in range(args.requests):
            metrics.request(ROUTES[i % 6], "POST", 200 if i % 10 else 422, 0.001 * (i % 300))
            metrics.stages("text", {"encode": 12.0, "first_stage": 1.0, "rerank": 3.0, "total": 16.0})
        return (time.perf_counter() - start) / args.requests * 1e6

    request_us = statistics.median(per_request() for _ in range(args.runs))
    for i in range(100):
        metrics.error(ROUTES[i % 6], f"code{i % 17}")

    def per_scrape() -> float:
        start = time.perf_counter()
        for _ in range(50):
            metrics.render(GAUGES)
        return (time.perf_counter() - start) / 50 * 1e6

    scrape_us = statistics.median(per_scrape() for _ in range(args.runs))
    size = len(metrics.render(GAUGES))
    print(f"{args.module or 'service/metrics.py'}: {request_us:.1f} us per request, "
          f"{scrape_us:.0f} us per scrape ({size:,} bytes)")  # fmt: skip


if __name__ == "__main__":
    main()
