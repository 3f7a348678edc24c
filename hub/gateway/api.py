"""The gateway's API contract: user-facing errors, the request context, and the routes, actions
and body validation read from ``hub/gateway/openapi.yaml`` (the single source of truth)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import tornado.web
import yaml

from beamhub.auth.tokens import Claims

__all__ = [
    "API_PREFIX",
    "OPENAPI_PATH",
    "PARAM_PATTERNS",
    "GatewayError",
    "Operation",
    "RequestContext",
    "bearer",
    "load_openapi",
    "parse_constant",
    "routes",
    "schema_error",
]

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
API_PREFIX = "api/v1"
#: What a path parameter may look like; anything else is a 404 before any work is done.
PARAM_PATTERNS = {
    "project": r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
    "channel_id": r"ch-[0-9a-f]{1,32}",
    "window_id": r"[0-9]{1,12}",
    "job_id": r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
    "name": r"[A-Za-z_][A-Za-z0-9_.-]{0,63}",
}


class GatewayError(tornado.web.HTTPError):
    """An error a person will read: JSON ``{error, reason, ...extra}`` with an HTTP status."""

    def __init__(self, status: int, reason: str, message: str, **extra: Any) -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        body = {"error": self.message, "reason": self.reason}
        body.update({k: v for k, v in self.extra.items() if k != "headers"})
        return body


@dataclass
class RequestContext:
    """One request as an operation sees it: verified claims, path parameters, validated body."""

    action: str
    method: str
    path: str
    source: str
    params: dict[str, str]
    authorization: str = field(default="", repr=False)  # the bearer token: never in a repr
    claims: Claims | None = None
    roles: frozenset[str] = frozenset()
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def project(self) -> str | None:
        return self.params.get("project")


@dataclass(frozen=True)
class Operation:
    """One method on one path of the OpenAPI document."""

    name: str
    action: str
    secured: bool
    validator: jsonschema.protocols.Validator | None


def load_openapi(path: str | Path = OPENAPI_PATH) -> dict[str, Any]:
    """The gateway's OpenAPI document (the single source of routes, actions and schemas)."""
    return yaml.safe_load(Path(path).read_text())


def routes(doc: Mapping[str, Any]) -> list[tuple[str, dict[str, Operation]]]:
    schemas = doc["components"]["schemas"]
    routes = []
    for path, methods in doc["paths"].items():
        regex = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m[1]}>{PARAM_PATTERNS[m[1]]})", path)
        ops = {}
        for method, spec in methods.items():
            validator = None
            if "x-body" in spec:
                schema = dict(schemas[spec["x-body"]])
                validator = jsonschema.Draft202012Validator(schema)
            ops[method.upper()] = Operation(
                spec["x-handler"], spec["x-action"], bool(spec.get("security")), validator
            )
        routes.append((regex.rstrip("/"), ops))
    return routes


def bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def parse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def schema_error(errors: Iterable[jsonschema.ValidationError]) -> GatewayError:
    error = jsonschema.exceptions.best_match(errors)
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        return GatewayError(
            400,
            "unknown_field",
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}",
            field=unknown[0] if unknown else where,
        )
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else where
        return GatewayError(400, "missing_field", f"missing field {missing!r}", field=missing)
    return GatewayError(400, "invalid_field", f"{where or 'body'}: {error.message}", field=where)
