"""Field readers of the admin template (and their shared error), kept apart from the checks.

Each reader validates one section of an admin's template YAML and raises :class:`TemplateError`
naming the field; :mod:`beamhub.streaming.template` assembles them into a :class:`~beamhub.streaming.template.
Template`.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "WHEN_NO_CONSUMER",
    "Network",
    "TemplateError",
    "is_int",
    "is_number",
    "is_z85_key",
    "read_bounded",
    "read_networks",
    "read_when_no_consumer",
]

#: What an L7 channel does with frames while no work consumer is connected (see dataplane.py).
WHEN_NO_CONSUMER = ("wait", "drop")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TemplateError(ValueError):
    """The template file itself is invalid (an admin's mistake): names the field."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def read_networks(value: Any, where: str) -> tuple[Network, ...]:
    if not isinstance(value, list) or not value:
        raise TemplateError(f"{where}: a non-empty list of networks, e.g. ['127.0.0.0/8']")
    nets = []
    for item in value:
        try:
            nets.append(ipaddress.ip_network(str(item), strict=True))
        except ValueError as exc:
            raise TemplateError(f"{where}: {item!r} is not a network ({exc})") from exc
    return tuple(nets)


def read_bounded(section: Any, where: str, *, need_min: bool, allow_null: bool = False):
    """Read ``{min?, max, default}`` of a positive number; ``None`` max means unbounded."""
    if not isinstance(section, Mapping):
        raise TemplateError(f"{where}: a mapping with 'max' and 'default'")
    unknown = set(section) - {"min", "max", "default"}
    if unknown:
        raise TemplateError(f"{where}: unknown key(s) {sorted(unknown)}; use min, max, default")
    lo = section.get("min", 1)
    hi = section.get("max")
    default = section.get("default", hi)
    if hi is None and not allow_null:
        raise TemplateError(f"{where}.max: required (a positive number)")
    for name, val in (("min", lo), ("max", hi), ("default", default)):
        if val is None and allow_null and name != "min":
            continue
        if not is_number(val) or val <= 0:
            raise TemplateError(f"{where}.{name}: must be a positive number, got {val!r}")
    if hi is not None and lo > hi:
        raise TemplateError(f"{where}: min {lo} is above max {hi}")
    if default is not None and (default < lo or (hi is not None and default > hi)):
        raise TemplateError(f"{where}.default: {default} is outside min {lo} .. max {hi}")
    if need_min and not is_int(lo):
        raise TemplateError(f"{where}.min: must be an integer")
    return lo, hi, default


def read_when_no_consumer(section: Any) -> tuple[tuple[str, ...], str]:
    """Read ``{allowed: [wait, drop], default: wait}`` (omitted: both allowed, default wait)."""
    if section is None:
        return WHEN_NO_CONSUMER, "wait"
    where = "when_no_consumer"
    if not isinstance(section, Mapping):
        raise TemplateError(f"{where}: a mapping with 'allowed' and 'default'")
    unknown = set(section) - {"allowed", "default"}
    if unknown:
        raise TemplateError(f"{where}: unknown key(s) {sorted(unknown)}; use allowed, default")
    allowed = section.get("allowed", list(WHEN_NO_CONSUMER))
    if (
        not isinstance(allowed, list)
        or not allowed
        or any(v not in WHEN_NO_CONSUMER for v in allowed)
    ):
        raise TemplateError(
            f"{where}.allowed: a non-empty list drawn from {list(WHEN_NO_CONSUMER)}, got {allowed!r}"
        )
    default = section.get("default", "wait" if "wait" in allowed else allowed[0])
    if default not in allowed:
        raise TemplateError(f"{where}.default: {default!r} is not one of allowed {allowed}")
    return tuple(allowed), default


def is_z85_key(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != 40:
        return False
    from zmq.utils import z85

    try:
        return len(z85.decode(value)) == 32
    except (ValueError, KeyError, TypeError):
        return False
