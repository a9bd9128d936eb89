"""The OpenAPI 3.1 description of the HTTP API, built in code.

It describes exactly the routes the application serves (a test checks both
ways) and uses a small subset of JSON Schema: type, properties, required,
additionalProperties, items, enum, minimum/maximum, pattern, $ref. The fuzz
tests generate requests from it and validate every answer against it.
"""

from __future__ import annotations

import copy
from typing import Any

from poller.api.routes_devices import DEVICE_STATES, MAX_POINTS, PAGE_DEFAULT, PAGE_MAX

Schema = dict[str, Any]

ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_ANY_OBJECT: Schema = {"type": "object"}

_SCHEMAS: dict[str, Schema] = {
    "Registered": {
        "type": "object", "required": ["registered", "disabled"],
        "additionalProperties": False,
        "properties": {"registered": {"type": "integer", "minimum": 0},
                       "disabled": {"type": "integer", "minimum": 0}},
    },
    "Session": {
        "type": "object", "required": ["access", "open"], "additionalProperties": False,
        "properties": {"access": {"type": "string", "enum": ["admin", "read", "none"]},
                       "open": {"type": "boolean", "description": "no token is configured: "
                                "the API (on loopback) takes every request"}},
    },
    "ImportRow": {
        "type": "object", "required": ["cloud_id"], "additionalProperties": False,
        "description": "One device, as a row of `poller import`: a field left out keeps "
                       "the registered value (a new device: add-user's default); a new "
                       "device needs `password` (or `install_code`).",
        "properties": {
            "cloud_id": {"type": "string", "pattern": ID_PATTERN}, "email": _STR,
            "password": {"type": "string", "writeOnly": True},
            "install_code": {"type": "string", "writeOnly": True},
            "driver": {"type": "string", "enum": ["eagle-cloud", "eagle-local", "http-json"]},
            "url": _nullable("string"),
            "interval_s": {"type": "number", "minimum": 0.1, "maximum": 86400},
            "enabled": _BOOL, "fields": _ANY_OBJECT, "options": _ANY_OBJECT,
        },
    },
    "ImportEntry": {
        "type": "object", "required": ["cloud_id", "fields"], "additionalProperties": False,
        "description": "A device added or changed (or that differs, left as it is); "
                       "`line` (NDJSON) or `item` (JSON array) names its row.",
        "properties": {"line": _INT, "item": _INT, "key": _STR, "cloud_id": _STR,
                       "fields": {"type": "array", "items": _STR}},
    },
    "ImportRefusal": {
        "type": "object", "required": ["cloud_id", "reason"], "additionalProperties": False,
        "properties": {"line": _INT, "item": _INT, "key": _STR,
                       "cloud_id": _nullable("string"), "reason": _STR},
    },
    "ImportReport": {
        "type": "object", "additionalProperties": False,
        "required": ["dry_run", "update", "rows", "counts", "added", "changed", "existing",
                     "refused", "batches", "batches_written", "rows_written", "error",
                     "error_code", "elapsed_s"],
        "properties": {
            "dry_run": _BOOL, "update": _BOOL, "rows": _INT,
            "counts": {"type": "object", "additionalProperties": False,
                       "required": ["added", "changed", "unchanged", "existing", "refused"],
                       "properties": {k: _INT for k in ("added", "changed", "unchanged",
                                                        "existing", "refused")}},
            "added": {"type": "array", "items": _ref("ImportEntry")},
            "changed": {"type": "array", "items": _ref("ImportEntry")},
            "existing": {"type": "array", "items": _ref("ImportEntry")},
            "refused": {"type": "array", "items": _ref("ImportRefusal")},
            "batches": _INT, "batches_written": _INT, "rows_written": _INT,
            "error": _nullable("string"), "error_code": _nullable("string"),
            "elapsed_s": _NUM,
        },
    },
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": _STR, "message": _STR}}},
    },
    "UserRequest": {
        "type": "object", "additionalProperties": False,
        "description": "Create (driver and password required) or update (any subset; "
                       "a new url or driver needs the password again). `url` must reach "
                       "an address polling.allowed_networks/denied_networks allow. "
                       "`fields` is a shorthand for `options.fields` (http-json driver).",
        "properties": {
            "email": _STR,
            "driver": {"type": "string", "enum": ["eagle-cloud", "eagle-local", "http-json"]},
            "url": _nullable("string"),
            "interval_s": {"type": "number", "minimum": 0.1, "maximum": 86400},
            "enabled": _BOOL,
            "password": {"type": "string", "writeOnly": True},
            "fields": _ANY_OBJECT,
            "options": _ANY_OBJECT,
        },
    },
    "DeviceStatus": {
        "type": ["object", "null"],
        "description": "In-memory status of a polled device; null when not polled.",
    },
    "Device": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "cloud_id", "email", "driver", "url", "options", "interval_s",
                     "enabled", "created_at", "updated_at", "status", "state"],
        "properties": {
            "id": _INT, "cloud_id": _STR, "email": _STR, "driver": _STR,
            "url": _nullable("string"), "options": _ANY_OBJECT, "interval_s": _NUM,
            "enabled": _BOOL, "created_at": _STR, "updated_at": _STR,
            "status": _ref("DeviceStatus"),
            "state": {"type": "string", "enum": list(DEVICE_STATES)},
            "status_source": {"type": "string", "enum": ["cluster"],
                              "description": "present when another cluster member polls "
                              "the device: its status comes from the live state in Redis"},
        },
    },
    "FailingDevices": {
        "type": "object", "required": ["devices"], "additionalProperties": False,
        "properties": {"devices": {"type": "array", "maxItems": 100,
                                   "items": _ref("Device")}},
    },
    "DeviceList": {
        "type": "object", "required": ["devices", "next_after"], "additionalProperties": False,
        "properties": {"devices": {"type": "array", "items": _ref("Device")},
                       "next_after": _nullable("integer")},
    },
    "Removed": {
        "type": "object", "required": ["removed", "id"], "additionalProperties": False,
        "properties": {"removed": _STR, "id": _INT},
    },
    "Reading": {
        "type": "object", "additionalProperties": False,
        "required": ["tick_at", "device_at", "received_at", "demand_w", "delivered_wh",
                     "received_wh", "price"],
        "properties": {
            "tick_at": _NUM, "device_at": _nullable("number"), "received_at": _NUM,
            "demand_w": _nullable("number"), "delivered_wh": _nullable("number"),
            "received_wh": _nullable("number"), "price": _nullable("number"),
        },
    },
    "Event": {
        "type": "object", "required": ["cloud_id", "source", "reading", "status"],
        "additionalProperties": False,
        "properties": {
            "cloud_id": _STR, "source": {"type": "string", "enum": ["redis", "postgres"]},
            "reading": {"anyOf": [_ref("Reading"), {"type": "null"}]},
            "status": _ref("DeviceStatus"),
        },
    },
    "Series": {
        "type": "object",
        "required": ["cloud_id", "from", "to", "step_s", "level", "points"],
        "additionalProperties": False,
        "properties": {
            "cloud_id": _STR, "from": _STR, "to": _STR, "step_s": _INT,
            "level": {"enum": ["raw", "minute", "hour"],
                      "description": "the table that answered: raw readings, or the "
                      "per-minute or per-hour rollups (picked from the step)"},
            "points": {"type": "array", "maxItems": MAX_POINTS, "items": {
                "type": "object",
                "required": ["t", "min", "avg", "max", "count", "energy_delivered_wh",
                             "energy_received_wh", "failed"],
                "additionalProperties": False,
                "properties": {"t": _STR, "min": _nullable("number"),
                               "avg": _nullable("number"), "max": _nullable("number"),
                               "count": _INT,
                               "energy_delivered_wh": _nullable("number"),
                               "energy_received_wh": _nullable("number"),
                               "failed": _nullable("integer")}}},
        },
    },
    "FleetDemand": {
        "type": "object", "required": ["from", "to", "step_s", "level", "points"],
        "additionalProperties": False,
        "properties": {
            "from": _STR, "to": _STR, "step_s": _INT, "level": {"enum": ["minute"]},
            "points": {"type": "array", "maxItems": MAX_POINTS, "items": {
                "type": "object", "required": ["t", "total_w", "devices", "outcomes"],
                "additionalProperties": False,
                "properties": {"t": _STR, "total_w": _nullable("number"), "devices": _INT,
                               "outcomes": {"type": "object",
                                            "additionalProperties": _INT}}}},
        },
    },
    "Archive": {
        "type": "object", "required": ["days", "levels"], "additionalProperties": False,
        "properties": {
            "days": {"type": "array", "description": "Today first.", "items": {
                "type": "object", "additionalProperties": False,
                "required": ["day", "hours_expected", "hours_uploaded", "bytes", "missing",
                             "behind"],
                "properties": {
                    "day": {"type": "string", "format": "date"},
                    "hours_expected": {"type": "integer", "minimum": 0, "maximum": 24,
                                       "description": "hours whose segments Postgres loaded"},
                    "hours_uploaded": {"type": "integer", "minimum": 0, "maximum": 24,
                                       "description": "of those, hours S3 holds verified "
                                       "(every segment, at its size)"},
                    "bytes": {"type": "integer", "minimum": 0,
                              "description": "bytes S3 holds for the day"},
                    "missing": {"type": "array", "items": {"type": "integer"},
                                "description": "expected hours not verified (UTC)"},
                    "behind": {"type": "boolean", "description": "a missing hour ended "
                               "more than 15 minutes ago"}}}},
            "levels": {"type": "array", "items": {
                "type": "object", "additionalProperties": False,
                "required": ["level", "keep_days", "oldest", "newest", "rows", "bytes"],
                "properties": {
                    "level": {"type": "string", "enum": ["raw", "minute", "hour"]},
                    "keep_days": {"type": "integer", "minimum": 0,
                                  "description": "retention; 0: forever"},
                    "oldest": _nullable("string"), "newest": _nullable("string"),
                    "rows": {"type": "integer", "description": "planner's estimate"},
                    "bytes": {"type": "integer"}}}},
        },
    },
    "Fleet": {
        "type": "object", "additionalProperties": False,
        "required": ["instance_id", "started_at", "devices", "devices_by_state",
                     "polls_by_outcome", "polls_by_driver_outcome", "polls_per_s",
                     "expected_polls_per_s", "lateness_p50_s", "lateness_p99_s",
                     "lateness_max_s", "lateness_window_p50_s", "lateness_window_p99_s",
                     "lateness_window_s", "skipped_ticks", "backpressure_skips", "in_flight",
                     "buffer_rows", "rows_committed", "copy_batches", "ingest_lag_s",
                     "spool_bytes", "segments_pending_upload", "upload_failures",
                     "upload_lag_s", "disk_used_fraction", "disk_warning", "postgres_up",
                     "redis_up", "s3_up", "polling", "clock_steps", "tick_conflicts",
                     "task_restarts", "rows_quarantined", "spool_ceiling_bytes",
                     "spool_full", "spool_errors", "segments_evicted",
                     "segments_awaiting_archive_load", "rows_loaded_from_archive",
                     "segments_unarchived", "shed_ticks", "connections_open",
                     "connections_opened", "connects_deferred", "timeouts_kept",
                     "requests_refused", "extra"],
        "properties": {
            "instance_id": _STR, "started_at": _NUM, "devices": _INT,
            "devices_by_state": {"type": "object", "additionalProperties": _INT},
            "polls_by_outcome": {"type": "object", "additionalProperties": _INT},
            "polls_by_driver_outcome": {
                "type": "object", "description": "driver -> outcome -> count",
                "additionalProperties": {"type": "object", "additionalProperties": _INT}},
            "polls_per_s": {"type": "object", "additionalProperties": _NUM},
            "expected_polls_per_s": _NUM, "lateness_p50_s": _NUM, "lateness_p99_s": _NUM,
            "cluster": {"type": "object", "description": "this instance's cluster "
                        "membership: {\"enabled\": false} outside a cluster; else the "
                        "members, their heartbeats and devices (see Running a cluster)"},
            "lateness_max_s": _NUM,
            "lateness_window_p50_s": _NUM, "lateness_window_p99_s": _NUM,
            "lateness_window_s": {"type": "number", "description": "seconds the window "
                                  "quantiles cover: the last hour (less, early on)"},
            "skipped_ticks": _INT, "backpressure_skips": _INT,
            "in_flight": _INT, "buffer_rows": _INT, "rows_committed": _INT,
            "copy_batches": _INT, "ingest_lag_s": _NUM, "spool_bytes": _INT,
            "segments_pending_upload": _INT, "upload_failures": _INT, "upload_lag_s": _NUM,
            "disk_used_fraction": _NUM, "disk_warning": _BOOL, "postgres_up": _BOOL,
            "redis_up": _BOOL, "s3_up": _BOOL, "polling": _BOOL, "clock_steps": _INT,
            "tick_conflicts": _INT,
            "task_restarts": {"type": "object", "description": "background task -> restarts",
                              "additionalProperties": _INT},
            "rows_quarantined": _INT,
            "spool_ceiling_bytes": _INT, "spool_full": _BOOL, "spool_errors": _INT,
            "segments_evicted": _INT, "segments_awaiting_archive_load": _INT,
            "rows_loaded_from_archive": _INT, "segments_unarchived": _INT,
            "shed_ticks": _INT, "connections_open": _INT, "connections_opened": _INT,
            "connects_deferred": _INT, "timeouts_kept": _INT, "requests_refused": _INT,
            "extra": _ANY_OBJECT,
        },
    },
    "Health": {
        "type": "object", "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok", "fail"]},
                       "failed": {"type": "array", "items": _STR}},
    },
    "Ready": {
        "type": "object", "required": ["status", "failed", "checks"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "string", "enum": ["ok", "fail"]},
            "failed": {"type": "array", "items": _STR},
            "checks": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["ok", "detail"], "additionalProperties": False,
                "properties": {"ok": _BOOL, "detail": _STR}}},
        },
    },
}


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> Schema:
    return {"description": description, "content": _json(_ref("Error"))}


_ERRORS = {
    "400": _error("Bad request: malformed id, JSON, field or query parameter."),
    "401": {**_error("Missing or invalid bearer token."),
            "headers": {"WWW-Authenticate": {"schema": _STR}}},
    "404": _error("No such device."),
    "421": _error("The Host header does not name this API (a write, or any request to "
                  "an API without tokens): the DNS-rebinding guard."),
    "500": _error("Internal error (a bug; logged)."),
    "503": _error("A dependency (Postgres, Redis) is not reachable."),
}
_WRITE_ERRORS = {
    **_ERRORS,
    "403": _error("The token may only read."),
    "409": _error("Conflicting concurrent registration."),
    "413": _error("Body larger than the limit."),
    "415": _error("A write whose body is not Content-Type: application/json."),
}
_ID_PARAM = {"name": "cloud_id", "in": "path", "required": True,
             "description": "The device's external id (6 hex digits for EAGLE devices).",
             "schema": {"type": "string", "pattern": ID_PATTERN}}
_READ_SECURITY: list[Schema] = [{"bearerAuth": []}]
_PUBLIC_SECURITY: list[Schema] = []


def _ok(description: str, schema: Schema, status: str = "200") -> Schema:
    return {status: {"description": description, "content": _json(schema)}}


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _paths() -> dict[str, Schema]:
    def time_schema(*examples: str) -> Schema:
        return {"type": "string", "description": "ISO 8601 (naive: UTC) or Unix seconds",
                "examples": list(examples)}
    return {
        "/api/event/{cloud_id}": {"get": {
            "operationId": "getEvent", "summary": "Latest reading and status of a device",
            "security": _READ_SECURITY, "parameters": [_ID_PARAM],
            "responses": {**_ok("Latest reading (Redis, else Postgres).", _ref("Event")),
                          **_ERRORS}}},
        "/api/users:import": {"post": {
            "operationId": "importUsers",
            "summary": "Register or update many devices (poller import): a JSON array "
                       "of rows, or NDJSON (Content-Type application/x-ndjson); one "
                       "transaction, at most 8 MiB",
            "security": _READ_SECURITY,
            "parameters": [
                _query("update", {"type": "string", "enum": ["true", "false"]},
                       "change existing devices that differ (default false: report them)"),
                _query("dry_run", {"type": "string", "enum": ["true", "false"]},
                       "report what would change, write nothing (default false)"),
            ],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "array",
                                                "items": _ref("ImportRow")}},
                "application/x-ndjson": {"schema": _ref("ImportRow")}}},
            "responses": {**_ok("What was written (or would be); refused rows are listed "
                                "with their reason, the others written.",
                                _ref("ImportReport")), **_WRITE_ERRORS}}},
        "/api/user/{cloud_id}": {
            "post": {
                "operationId": "putUser", "summary": "Create or update a device",
                "security": _READ_SECURITY, "parameters": [_ID_PARAM],
                "requestBody": {"required": True, "content": _json(_ref("UserRequest"))},
                "responses": {**_ok("Updated.", _ref("Device")),
                              **_ok("Created.", _ref("Device"), "201"), **_WRITE_ERRORS}},
            "delete": {
                "operationId": "deleteUser", "summary": "Stop polling a device, wipe its "
                "credentials (readings stay)", "security": _READ_SECURITY,
                "parameters": [_ID_PARAM],
                "responses": {**_ok("Removed.", _ref("Removed")), **_WRITE_ERRORS}},
        },
        "/api/devices": {"get": {
            "operationId": "listDevices", "summary": "Registered devices, paginated by id",
            "security": _READ_SECURITY,
            "parameters": [
                _query("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_MAX},
                       f"page size (default {PAGE_DEFAULT})"),
                _query("after", {"type": "integer", "minimum": 0},
                       "cursor: the `next_after` of the previous page"),
                _query("state", {"type": "string", "enum": list(DEVICE_STATES)},
                       "only devices in this state; a filtered page may hold fewer than "
                       "`limit` devices (`disabled`, `unpolled`: even none, each request "
                       "reads a bounded stretch of the registry): go on while "
                       "`next_after` is not null"),
                _query("q", {"type": "string", "minLength": 1, "maxLength": 64},
                       "search: a prefix of the cloud id or a part of the email, any case"),
                _query("driver", {"type": "string",
                                  "enum": ["eagle-cloud", "eagle-local", "http-json"]},
                       "only devices of this driver"),
                _query("order", {"type": "string", "enum": ["asc", "desc"]},
                       "by id, oldest (asc, default) or newest first; desc only without "
                       "`state` (`after` is then the id to go below)"),
            ],
            "responses": {**_ok("A page of devices.", _ref("DeviceList")), **_ERRORS}}},
        "/api/devices/{cloud_id}": {"get": {
            "operationId": "getDevice", "summary": "One registered device",
            "security": _READ_SECURITY, "parameters": [_ID_PARAM],
            "responses": {**_ok("The device.", _ref("Device")), **_ERRORS}}},
        "/api/devices/{cloud_id}/readings": {"get": {
            "operationId": "getReadings",
            "summary": f"min/avg/max demand_w per time bucket (at most {MAX_POINTS} buckets, "
                       "range at most 366 days)",
            "security": _READ_SECURITY,
            "parameters": [
                _ID_PARAM,
                _query("from", time_schema("2024-05-01T00:00:00Z", "1714521600"),
                       "start, inclusive (default: to minus one day)"),
                _query("to", time_schema("2024-05-01T06:00:00+02:00", "1714543200"),
                       "end, exclusive (default: now)"),
                _query("step", {"type": "integer", "minimum": 1}, "bucket seconds (default 60)"),
            ],
            "responses": {**_ok("Buckets that hold readings, in time order.", _ref("Series")),
                          **_ERRORS}}},
        "/api/fleet": {"get": {
            "operationId": "getFleet", "summary": "Fleet-wide statistics",
            "security": _READ_SECURITY,
            "responses": {**_ok("The fleet snapshot.", _ref("Fleet")), **_ERRORS}}},
        "/api/fleet/demand": {"get": {
            "operationId": "getFleetDemand",
            "summary": "The fleet's total demand and devices by outcome per step, from the "
                       "per-minute fleet rollup",
            "security": _READ_SECURITY,
            "parameters": [
                _query("from", time_schema("2024-05-01T00:00:00Z", "1714521600"),
                       "start, inclusive, rounded down to the minute (default: to minus "
                       "one day)"),
                _query("to", time_schema("2024-05-01T06:00:00+02:00", "1714543200"),
                       "end, exclusive, rounded up to the minute (default: now)"),
                _query("step", {"type": "integer", "minimum": 60, "multipleOf": 60},
                       "bucket seconds, a multiple of 60 (default 60)"),
            ],
            "responses": {**_ok("Minutes that hold data, in time order.",
                                _ref("FleetDemand")), **_ERRORS}}},
        "/api/archive": {"get": {
            "operationId": "getArchive",
            "summary": "Archive completeness by day, and what each storage level holds",
            "security": _READ_SECURITY,
            "parameters": [_query("days", {"type": "integer", "minimum": 1, "maximum": 62},
                                  "days to report, today first (default 7)")],
            "responses": {**_ok("Archive and levels.", _ref("Archive")), **_ERRORS}}},
        "/api/openapi.json": {"get": {
            "operationId": "getOpenApi", "summary": "This document",
            "security": _READ_SECURITY,
            "responses": {**_ok("OpenAPI 3.1 document.", _ANY_OBJECT), **_ERRORS}}},
        "/metrics": {"get": {
            "operationId": "getMetrics", "summary": "Prometheus metrics (no token needed)",
            "security": _PUBLIC_SECURITY,
            "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                  "content": {"text/plain": {"schema": _STR}}},
                          "500": _ERRORS["500"]}}},
        "/healthz": {"get": {
            "operationId": "getHealthz", "summary": "Liveness: process and event loop "
            "(no token needed)", "security": _PUBLIC_SECURITY,
            "responses": {**_ok("Alive.", _ref("Health")),
                          **_ok("Event loop unresponsive.", _ref("Health"), "503"),
                          "500": _ERRORS["500"]}}},
        "/api/fleet/failing": {"get": {
            "operationId": "getMostFailing", "summary": "The polled devices failing "
            "longest (most failures in a row, failing and auth_failed), most first",
            "security": _READ_SECURITY,
            "parameters": [_query("limit", {"type": "integer", "minimum": 1, "maximum": 100},
                                  "how many (default 10)")],
            "responses": {**_ok("The devices, most failures in a row first.",
                                _ref("FailingDevices")), **_ERRORS}}},
        "/api/fleet/registered": {"get": {
            "operationId": "getRegistered", "summary": "Devices registered (not removed) "
            "and how many of them are disabled", "security": _READ_SECURITY,
            "responses": {**_ok("The counts.", _ref("Registered")), **_ERRORS}}},
        "/api/session": {"get": {
            "operationId": "getSession", "summary": "What the bearer token may do (the "
            "dashboard shows admin controls only to `admin`); no token: `none`",
            "security": _PUBLIC_SECURITY,
            "responses": {**_ok("The token's access.", _ref("Session")),
                          "401": _ERRORS["401"], "500": _ERRORS["500"]}}},
        "/": {"get": {
            "operationId": "getRoot", "summary": "Redirects to the dashboard, /ui/ "
            "(no token needed)", "security": _PUBLIC_SECURITY,
            "responses": {"302": {"description": "Location: /ui/"},
                          "500": _ERRORS["500"]}}},
        "/ui/{path}": {"get": {
            "operationId": "getDashboardFile", "summary": "The dashboard's static files "
            "(no token needed: they hold no data)", "security": _PUBLIC_SECURITY,
            "parameters": [{"name": "path", "in": "path", "required": True,
                            "description": "a file of the dashboard; empty: index.html",
                            "schema": _STR}],
            "responses": {"200": {"description": "The file (HTML, JavaScript, CSS)",
                                  "content": {"text/html": {"schema": _STR}}},
                          "304": {"description": "Not modified (If-None-Match)"},
                          "404": _error("No such file."), "500": _ERRORS["500"]}}},
        "/readyz": {"get": {
            "operationId": "getReadyz", "summary": "Readiness: Postgres, polling, ingest lag "
            "(no token needed)", "security": _PUBLIC_SECURITY,
            "responses": {**_ok("Ready.", _ref("Ready")),
                          **_ok("Not ready; `failed` names the checks.", _ref("Ready"), "503"),
                          "500": _ERRORS["500"]}}},
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy each call)."""
    paths = _paths()
    for path in ("/api/user/{cloud_id}", "/api/users:import"):
        for op in paths[path].values():
            op["description"] = "Needs the admin token."
    return {
        "openapi": "3.1.0",
        "info": {"title": "poller", "version": "1",
                 "description": "Reads need the read or the admin token, writes the admin "
                                "token. /metrics, /healthz and /readyz need none: they "
                                "expose no secret and no device data."},
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "api.admin_token (read and write) or api.read_token (read)"}},
        },
    }
