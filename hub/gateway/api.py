"""The gateway's API contract: the request context, and the routes, actions and body validation
read from ``hub/gateway/openapi.yaml`` (the single source of truth). Errors are
:class:`beamhub.auth.api.ApiError`, in the one shape of every beamhub service."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from beamhub.auth.api import ApiError
from beamhub.auth.tokens import Claims

__all__ = [
    "API_PREFIX",
    "OPENAPI_PATH",
    "Operation",
    "RequestContext",
    "load_openapi",
    "parse_constant",
    "routes",
    "schema_error",
]

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
API_PREFIX = "api/v1"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options"})


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


def _path_patterns(doc: Mapping[str, Any], path: str, item: Mapping[str, Any]) -> dict[str, str]:
    """Each path parameter's regex, from the document's ``components/parameters`` patterns."""
    shared = doc["components"].get("parameters", {})
    patterns = {}
    for param in item.get("parameters", []):
        if "$ref" in param:
            param = shared[param["$ref"].rsplit("/", 1)[1]]
        patterns[param["name"]] = param["schema"]["pattern"].removeprefix("^").removesuffix("$")
    for name in re.findall(r"\{(\w+)\}", path):
        if name not in patterns:
            raise ValueError(
                f"openapi.yaml: path {path!r} has no 'parameters' entry for {{{name}}}; "
                f"add {{$ref: '#/components/parameters/{name}'}} (with a schema pattern)"
            )
    return patterns


def routes(doc: Mapping[str, Any]) -> list[tuple[str, dict[str, Operation]]]:
    """(path regex, {METHOD: Operation}) for every path of the document."""
    schemas = doc["components"]["schemas"]
    routes = []
    for path, item in doc["paths"].items():
        patterns = _path_patterns(doc, path, item)
        regex = path
        for name, pattern in patterns.items():
            regex = regex.replace("{" + name + "}", f"(?P<{name}>{pattern})")
        ops = {}
        for method, spec in item.items():
            if method not in HTTP_METHODS:
                continue
            validator = None
            if "x-body" in spec:
                schema = dict(schemas[spec["x-body"]])
                validator = jsonschema.Draft202012Validator(schema)
            ops[method.upper()] = Operation(
                spec["x-handler"], spec["x-action"], bool(spec.get("security")), validator
            )
        routes.append((regex.rstrip("/"), ops))
    return routes


def parse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def schema_error(errors: Iterable[jsonschema.ValidationError]) -> ApiError:
    error = jsonschema.exceptions.best_match(errors)
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        return ApiError(
            400,
            "unknown_field",
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}",
            field=unknown[0] if unknown else where,
        )
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else where
        return ApiError(400, "missing_field", f"missing field {missing!r}", field=missing)
    return ApiError(
        400, "invalid_field", f"{where or 'body'}: {error.message}", field=where or None
    )
