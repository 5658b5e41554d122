"""The hand-written Prometheus exposition format."""

from __future__ import annotations

import re

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
    assert 'hat_http_requests_total{route="/search/text",method="POST",status="200"} 2' in text
    assert 'hat_http_errors_total{route="/search/text",code="empty_query"} 1' in text
    assert 'hat_index_info{version="v\\"1\\\\\\n"} 1.0' in text  # quote, backslash and newline escaped
    assert "# TYPE hat_request_duration_seconds histogram" in text


def test_histogram_buckets_are_cumulative():
    m = Metrics()
    for seconds in (0.0005, 0.02, 0.02, 7.0, 60.0):
        m.request("/x", "GET", 200, seconds)
    text = m.render([])
    bucket = {
        le: int(v)
        for le, v in re.findall(r'hat_request_duration_seconds_bucket\{route="/x",le="([^"]+)"\} (\d+)', text)
    }
    assert bucket["0.001"] == 1 and bucket["0.025"] == 3 and bucket["10.0"] == 4 and bucket["+Inf"] == 5
    values = list(bucket.values())
    assert values == sorted(values)
    assert 'hat_request_duration_seconds_count{route="/x"} 5' in text
    assert re.search(r'hat_request_duration_seconds_sum\{route="/x"\} 67\.04', text)
