"""Schemathesis hooks of tests/service/test_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

A metadata filter's keys are the served index's metadata keys, which the service's schema cannot list: a
schema-valid filter naming any other key is rightly refused (422 ``unknown_filter_key``, tested by hand in
tests/service/test_filters_strength_explain.py). So the schema the fuzzer reads states the test index's keys
(``n``, ``split``) as the filter's property names; its values stay as the service documents them, so the fuzzer
still checks that every schema-valid filter value is accepted and every invalid one refused.
"""

from __future__ import annotations

import schemathesis

KEYS = ["n", "split"]  # the metadata keys of the service tests' index (tests/service/conftest.py)


@schemathesis.hook
def before_load_schema(context, raw_schema):
    _name_filter_keys(raw_schema)


def _name_filter_keys(node) -> None:
    """Every ``filter`` property's object form gets ``propertyNames: {"enum": KEYS}``."""
    if isinstance(node, dict):
        flt = (node.get("properties") or {}).get("filter")
        for member in (flt or {}).get("anyOf", []) if isinstance(flt, dict) else []:
            if member.get("type") == "object":
                member["propertyNames"] = {"enum": KEYS}
        for value in node.values():
            _name_filter_keys(value)
    elif isinstance(node, list):
        for value in node:
            _name_filter_keys(value)
