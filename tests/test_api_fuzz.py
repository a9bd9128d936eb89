"""Schema-driven fuzzing: requests generated from the OpenAPI document.

For every operation, Hypothesis builds path, query and body values from the
document's own schemas, mixed with arbitrary text and JSON. Every answer must
be below 500, have a status the document lists for the operation, and (when
JSON) validate against the schema documented for that status.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.api.openapi import document
from poller.clock import LoopClock
from poller.config import RetentionSettings
from poller.retention.job import RetentionJob
from poller.retention.policy import RetentionPolicy
from tests.apiview import ADMIN_TOKEN, ApiServer, settings_with
from tests.stackfix import RunningStack, fresh_database_url
from tests.test_archive import make_store

DOC = document()
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
# Deletions last: they remove the known devices the other operations look up.
OPERATIONS = sorted(((path, method, op) for path, ops in DOC["paths"].items()
                     for method, op in ops.items()), key=lambda o: o[1] == "delete")
EXAMPLES = 30

JSON_LEAF = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
ANY_JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) |
                        st.dictionaries(st.text(max_size=10), inner, max_size=4),
                        max_leaves=12)


# -- a validator for the subset of JSON Schema the document uses ----------------

def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _is(kind: str, value: Any) -> bool:
    return {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }[kind]


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Errors of ``value`` against ``schema`` (empty: valid)."""
    schema = _resolve(schema)
    if "anyOf" in schema:
        if any(not validate(value, s, where) for s in schema["anyOf"]):
            return []
        return [f"{where}: matches none of anyOf"]
    errors: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(k, value) for k in kinds):
            return [f"{where}: {value!r:.60} is not {'/'.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if _is("number", value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: above maximum")
    if isinstance(value, str) and "pattern" in schema and \
            not re.search(schema["pattern"], value):
        errors.append(f"{where}: does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where}: too many items")
        for i, item in enumerate(value):
            errors += validate(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{where}: missing {k!r}" for k in schema.get("required", [])
                   if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errors += validate(v, props[k], f"{where}.{k}")
            elif extra is False:
                errors.append(f"{where}: unexpected property {k!r}")
            elif isinstance(extra, dict):
                errors += validate(v, extra, f"{where}.{k}")
    return errors


def test_validator_rejects_what_it_should() -> None:
    device = {"$ref": "#/components/schemas/Device"}
    assert validate({"error": {"code": "x", "message": "y"}}, SCHEMAS["Error"]) == []
    assert validate({"error": {"code": "x"}}, SCHEMAS["Error"])
    assert validate({"error": {"code": "x", "message": "y", "z": 1}}, SCHEMAS["Error"])
    assert validate({"id": True}, device)
    assert validate({"status": "maybe", "failed": [], "checks": {}}, SCHEMAS["Ready"])
    assert validate({"reading": 5}, SCHEMAS["Event"])


# -- strategies from schemas -----------------------------------------------------

def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    schema = _resolve(schema)
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kinds = schema.get("type", "object")
    if isinstance(kinds, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kinds])
    if kinds == "null":
        return st.none()
    if kinds == "boolean":
        return st.booleans()
    if kinds == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kinds == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"),
                         allow_nan=False, allow_infinity=False)
    if kinds == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(max_size=30)
    if kinds == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=3)
    props = schema.get("properties")
    if not props:
        return st.dictionaries(st.text(max_size=10), ANY_JSON, max_size=4)
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {k: from_schema(v) for k, v in props.items() if k in required},
        optional={k: from_schema(v) for k, v in props.items() if k not in required})


KNOWN_IDS: list[str] = []


def path_value(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    known = st.sampled_from(KNOWN_IDS) if KNOWN_IDS else st.nothing()
    return st.one_of(known, known, from_schema(schema), st.text(max_size=12))


def query_value(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    if "examples" in schema:
        return st.one_of(st.sampled_from(schema["examples"]), st.text(max_size=25))
    typed = from_schema(schema).map(lambda v: v if isinstance(v, str) else json.dumps(v))
    return st.one_of(typed, st.text(max_size=25),
                     st.integers(-10**12, 10**12).map(str))


def _dumps(value: Any) -> bytes:
    # The standard library: orjson refuses integers beyond 64 bits, the fuzzer wants them.
    return json.dumps(value).encode()


@st.composite
def requests(draw: st.DrawFn, path: str, op: dict[str, Any]) -> tuple[str, bytes | None]:
    url = path
    query: list[tuple[str, str]] = []
    for param in op.get("parameters", []):
        if param["in"] == "path":
            value = draw(path_value(param["schema"]))
            url = url.replace("{" + param["name"] + "}", quote(value, safe=""))
        elif draw(st.booleans()):
            query.append((param["name"], draw(query_value(param["schema"]))))
    if draw(st.integers(0, 9)) == 0:
        query.append((draw(st.text(min_size=1, max_size=8)), draw(st.text(max_size=8))))
    if query:
        url += "?" + urlencode(query)
    body: bytes | None = None
    if "requestBody" in op:
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        body = draw(st.one_of(from_schema(schema).map(_dumps), ANY_JSON.map(_dumps),
                              st.binary(max_size=40)))
    return url, body


# -- the fuzzing ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server(stack: RunningStack) -> Iterator[ApiServer]:
    srv = ApiServer(fresh_database_url(stack.info), stack.info.redis_url,
                    settings_with(ADMIN_TOKEN, "read-token-0123456789abcdef")).start()
    # GET /api/archive reads the real S3 through a retention job, as in serve.
    store = make_store(stack)
    srv.run(store.start())
    assert srv.view is not None
    srv.view.retention = RetentionJob(RetentionPolicy(RetentionSettings(), store, "fuzz"),
                                      srv.view.pool, LoopClock())
    try:
        for driver, cid in (("eagle-cloud", uuid.uuid4().hex[:6]),
                            ("http-json", "fuzz-" + uuid.uuid4().hex[:6])):
            reply = srv.request("POST", f"/api/user/{cid}", token=ADMIN_TOKEN, json={
                "email": "a@b.example", "driver": driver, "password": "pw",
                "url": "http://127.0.0.1:9/" if driver == "http-json" else None,
                **({"fields": {"demand_w": "/w"}} if driver == "http-json" else {})})
            assert reply.status == 201, reply.body
            KNOWN_IDS.append(cid)
        yield srv
    finally:
        KNOWN_IDS.clear()
        srv.run(store.close())
        srv.stop()


def check_reply(op: dict[str, Any], method: str, url: str, status: int,
                headers: dict[str, str], body: bytes) -> None:
    where = f"{method.upper()} {url} -> {status}: {body[:300]!r}"
    assert status < 500, where
    documented = op["responses"].get(str(status))
    assert documented is not None, f"undocumented status: {where}"
    content = documented.get("content", {})
    if "application/json" in content:
        assert headers.get("Content-Type", "").startswith("application/json"), where
        errors = validate(orjson.loads(body), content["application/json"]["schema"])
        assert not errors, f"{where}\n{errors}"


@pytest.mark.parametrize(("path", "method", "op"), OPERATIONS,
                         ids=[f"{m.upper()} {p}" for p, m, _ in OPERATIONS])
def test_fuzz_operation(server: ApiServer, path: str, method: str, op: dict[str, Any]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests(path, op))
    def fuzz(request: tuple[str, bytes | None]) -> None:
        url, body = request
        reply = server.request(method.upper(), url, token=ADMIN_TOKEN, body=body)
        check_reply(op, method, url, reply.status, reply.headers, reply.body)

    fuzz()
