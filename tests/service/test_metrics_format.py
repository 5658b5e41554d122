"""The Prometheus exposition of ``service.metrics`` (written by prometheus_client): names, types, labels,
escaping, cumulative buckets; one registry per ``Metrics``, no ``_created`` samples."""

from __future__ import annotations

import re

from live_server import metric

from service.metrics import Metrics

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? -?[0-9.e+Inf-]+$')


def test_render_is_valid_exposition_text():
    m = Metrics()
    m.request("/search/text", "POST", 200, 0.02)
    m.request("/search/text", "POST", 200, 3.0)
    m.request("/search/text", "POST", 422, 0.001)
    m.error("/search/text", "empty_query")
    m.stages("text", {"encode": 12.0, "rerank": 3.0, "total": 15.0})
    m.reload("success")
    text = m.render([("hat_index_info", "The version.", {"version": 'v"1\\\n'}, 1.0)])
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or SAMPLE.match(line), line
    assert metric(text, "hat_http_requests_total", route="/search/text", method="POST", status="200") == 2
    assert metric(text, "hat_http_errors_total", route="/search/text", code="empty_query") == 1
    assert metric(text, "hat_index_reloads_total", result="success") == 1
    assert metric(text, "hat_search_stage_duration_seconds_count", search="text", stage="rerank") == 1
    assert 'hat_index_info{version="v\\"1\\\\\\n"} 1.0' in text  # quote, backslash and newline escaped
    for name, kind in (
        ("hat_http_requests_total", "counter"),
        ("hat_http_errors_total", "counter"),
        ("hat_index_reloads_total", "counter"),
        ("hat_request_duration_seconds", "histogram"),
        ("hat_search_stage_duration_seconds", "histogram"),
        ("hat_search_batch_size", "histogram"),
        ("hat_index_info", "gauge"),
    ):
        assert f"# TYPE {name} {kind}\n" in text and f"# HELP {name} " in text
    assert "_created" not in text


def test_histogram_buckets_are_cumulative():
    m = Metrics()
    for seconds in (0.0005, 0.02, 0.02, 7.0, 60.0):
        m.request("/x", "GET", 200, seconds)
    text = m.render([])
    bucket = {le: metric(text, "hat_request_duration_seconds_bucket", route="/x", le=le)
              for le in ("0.001", "0.025", "10.0", "+Inf")}  # fmt: skip
    assert bucket == {"0.001": 1, "0.025": 3, "10.0": 4, "+Inf": 5}
    values = [float(v) for v in re.findall(r'hat_request_duration_seconds_bucket\{le="[^"]+",route="/x"\} (\S+)', text)]
    assert len(values) == 14 and values == sorted(values)
    assert metric(text, "hat_request_duration_seconds_count", route="/x") == 5
    assert abs(metric(text, "hat_request_duration_seconds_sum", route="/x") - 67.0405) < 1e-9


def test_each_metrics_object_counts_apart():
    """Two apps in one process (the tests run many) have their own registries: nothing is shared."""
    a, b = Metrics(), Metrics()
    a.request("/healthz", "GET", 200, 0.001)
    assert metric(a.render([]), "hat_http_requests_total", route="/healthz", method="GET", status="200") == 1
    assert metric(b.render([]), "hat_http_requests_total", route="/healthz", method="GET", status="200") is None
    assert a.requests == {("/healthz", "GET", "200"): 1} and b.requests == {}


def test_gauges_of_one_name_form_one_family():
    gauges = [
        ("hat_model_info", "The model.", {"identity": "a"}, 1.0),
        ("hat_model_info", "The model.", {"identity": "b"}, 0.0),
        ("hat_ready", "Ready.", {}, 1.0),
    ]
    text = Metrics().render(gauges)
    assert text.count("# TYPE hat_model_info gauge") == 1
    assert metric(text, "hat_model_info", identity="b") == 0 and metric(text, "hat_ready") == 1
