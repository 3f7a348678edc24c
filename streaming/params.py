"""Steerable source parameters: a schema that UIs can render and a set that refuses bad values."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["PARAM_TYPES", "ParamError", "ParamSet", "ParamSpec", "UnknownParamError"]

PARAM_TYPES = ("float", "int", "bool", "choice")


class ParamError(ValueError):
    """A value the schema refuses. ``field`` names the parameter, ``limit`` the bound it broke."""

    def __init__(self, field: str, message: str, limit: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.limit = limit


class UnknownParamError(ParamError):
    """A parameter name that the schema does not have."""


@dataclass(frozen=True)
class ParamSpec:
    """One steerable parameter: its type, bounds, step and meaning (units, description)."""

    name: str
    type: str
    default: Any
    description: str = ""
    units: str = ""
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter {self.name!r}: type must be one of {PARAM_TYPES}")
        if self.type == "choice" and not self.choices:
            raise ValueError(f"parameter {self.name!r}: a 'choice' parameter needs choices")
        self.validate(self.default)  # a schema whose default is invalid is a programming error

    def validate(self, value: Any) -> Any:
        """Return the value normalised to the parameter's type, or raise :class:`ParamError`."""
        if self.type == "bool":
            if not isinstance(value, bool):
                raise ParamError(self.name, f"must be true or false, got {value!r}", limit="bool")
            return value
        if self.type == "choice":
            if value not in self.choices:
                raise ParamError(
                    self.name,
                    f"must be one of {list(self.choices)}, got {value!r}",
                    limit=list(self.choices),
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(self.name, f"must be a number, got {value!r}", limit=self.type)
        if self.type == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise ParamError(self.name, f"must be an integer, got {value!r}", limit="int")
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ParamError(
                    self.name, f"must be a finite number, got {value!r}", limit="finite"
                )
        if self.min is not None and value < self.min:
            raise ParamError(
                self.name,
                f"{value!r} is below the minimum {self.min} {self.units}".rstrip(),
                limit={"min": self.min},
            )
        if self.max is not None and value > self.max:
            raise ParamError(
                self.name,
                f"{value!r} is above the maximum {self.max} {self.units}".rstrip(),
                limit={"max": self.max},
            )
        return value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "units": self.units,
            "description": self.description,
        }
        if self.type in ("float", "int"):
            out.update(min=self.min, max=self.max, step=self.step)
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


class ParamSet:
    """Current values of a schema. Not thread-safe by itself: the source runner holds its lock."""

    def __init__(self, specs: Iterable[ParamSpec], values: dict[str, Any] | None = None) -> None:
        self.specs: dict[str, ParamSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise ValueError(f"parameter {spec.name!r} is declared twice")
            self.specs[spec.name] = spec
        self._values = {name: spec.default for name, spec in self.specs.items()}
        for name, value in (values or {}).items():
            self.set(name, value)

    def spec(self, name: str) -> ParamSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise UnknownParamError(
                name, f"unknown parameter; known: {', '.join(sorted(self.specs))}"
            ) from None

    def validate(self, name: str, value: Any) -> Any:
        """The normalised value that :meth:`set` would store, without storing it."""
        return self.spec(name).validate(value)

    def set(self, name: str, value: Any) -> Any:
        """Validate and store; returns the normalised value."""
        value = self.validate(name, value)
        self._values[name] = value
        return value

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def schema(self) -> list[dict[str, Any]]:
        return [spec.to_json() for spec in self.specs.values()]
