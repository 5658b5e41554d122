"""The HTTP contract stays: every path, method and documented status, and the field names and types of every
request and response body, as the live server's ``/openapi.json`` states them, equal the snapshot in
``openapi_contract.json`` (descriptions, titles and limits are left out: they may change freely).

A deliberate change of the contract updates the snapshot: ``python tests/service/test_openapi_contract.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("openapi_contract.json")


def _type(schema: dict[str, Any]) -> Any:
    """A schema's type, without its limits or words: ``"integer"``, ``["integer", "null"]``, ``{"array": ...}``,
    ``{"map": ...}``, ``{"enum": [...]}`` or the name of a component schema."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return [_type(member) for member in schema["anyOf"]]
    if "const" in schema:
        return {"enum": [schema["const"]]}
    if "enum" in schema:
        return {"enum": schema["enum"]}
    kind = schema.get("type", "any")
    if kind == "array":
        return {"array": _type(schema.get("items", {}))}
    if kind == "object" and "properties" in schema:
        return _fields(schema)
    if kind == "object":
        extra = schema.get("additionalProperties", True)
        return {"map": _type(extra) if isinstance(extra, dict) else "any"}
    return {"string": schema["format"]} if kind == "string" and "format" in schema else kind


def _fields(schema: dict[str, Any]) -> dict[str, Any]:
    """An object schema's fields: their types, which are required, and whether others are refused."""
    return {
        "fields": {name: _type(field) for name, field in sorted(schema.get("properties", {}).items())},
        "required": sorted(schema.get("required", [])),
        "closed": schema.get("additionalProperties") is False,
    }


def _content(content: dict[str, Any]) -> dict[str, Any]:
    return {media: _type(entry.get("schema", {})) for media, entry in sorted(content.items())}


def contract(openapi: dict[str, Any]) -> dict[str, Any]:
    """What clients rely on in an OpenAPI document: operations with their parameters, body and responses by
    status (media type -> type), and the fields of every component schema."""
    operations = {}
    for path, methods in sorted(openapi["paths"].items()):
        for method, op in sorted(methods.items()):
            body = op.get("requestBody")
            operations[f"{method.upper()} {path}"] = {
                "parameters": sorted(f"{p['in']}:{p['name']}:{_type(p['schema'])}" for p in op.get("parameters", [])),
                "request": {"required": body.get("required", False), **_content(body["content"])} if body else None,
                "responses": {status: _content(r.get("content", {})) for status, r in sorted(op["responses"].items())},
            }
    schemas = openapi.get("components", {}).get("schemas", {})
    return {"operations": operations, "schemas": {name: _fields(s) for name, s in sorted(schemas.items())}}


def test_openapi_contract_is_unchanged(client):
    live = contract(client.get("/openapi.json").json())
    expected = json.loads(SNAPSHOT.read_text())
    assert live == expected, "the HTTP contract changed; if on purpose: python tests/service/test_openapi_contract.py"


def test_contract_sees_what_it_is_about():
    """The snapshot holds every operation with its statuses, and the fields of both kinds of body."""
    snapshot = json.loads(SNAPSHOT.read_text())
    ops = snapshot["operations"]
    assert set(ops) == {"GET /healthz", "GET /readyz", "GET /index", "GET /images/{image_id}", "POST /admin/reload",
                        "POST /search/text", "POST /search/image"}  # fmt: skip
    assert set(ops["POST /search/text"]["responses"]) == {"200", "400", "413", "415", "422", "503"}
    text = ops["POST /search/text"]["request"]["application/json"]
    assert set(text["fields"]) == {"candidates", "k", "query", "filter", "explain"}
    assert text["fields"]["k"] == ["integer", "null"] and text["fields"]["explain"] == "boolean"
    assert text["closed"] and text["required"] == ["query"]
    assert ops["POST /search/image"]["request"]["multipart/form-data"]["fields"]["image"] == {"string": "binary"}
    result = snapshot["schemas"]["Result"]["fields"]
    assert result["score"] == "number" and result["image_url"] == ["string", "null"]


if __name__ == "__main__":  # rewrite the snapshot from the app as it is now
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from service.app import create_app
    from service.settings import Settings

    SNAPSHOT.write_text(json.dumps(contract(create_app(Settings()).openapi()), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
