"""Change records: every change of beamhub.yaml, the policy or the stream templates, audited.

The gateway keeps a snapshot of the files it watches (``<state>/gateway-config/snapshot.json``:
each file's sha256 and text). At start and at each reload (SIGHUP, sent by `beamhub policy
reload`) it compares the files with the snapshot and appends one ``config.change`` record per
changed file to the hash-chained audit log: the file, a diff summary, and who made it.

"Who" is what the gateway can know: the OS user owning the changed file (``owner``), and, for a
reload asked for with `beamhub policy reload`, the OS user who asked (the owner of the request
file it writes, which that user cannot forge). Who typed the edit is not knowable from the file.

The summary of a YAML file names the dotted keys added, removed or changed — never their values,
so a secret in beamhub.yaml does not reach the log — and the lines added and removed.

A changed policy goes live only when it parses and its own ``tests:`` pass (as `beamhub policy
test` runs them); otherwise the reload is refused (a ``config.reload`` record with outcome
``deny`` and the failures), the running policy stays, and the snapshot keeps the old policy so
the next reload reports the change again. beamhub.yaml and template changes are recorded; the
services that read them (the hub, the DSN) apply them when `beamhub up` restarts them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import pwd
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RELOAD_REQUEST", "Change", "ConfigWatch", "diff_summary", "yaml_key_changes"]

#: Written by `beamhub policy reload` before it signals the gateway: who asked.
RELOAD_REQUEST = "reload-request.json"
#: Written by the gateway after each reload: what happened (read by `beamhub policy reload`).
LAST_RELOAD = "last-reload.json"
_MAX_KEYS = 12


@dataclass(frozen=True)
class Change:
    """One watched file that differs from the snapshot."""

    kind: str  # deployment | policy | template
    path: str
    what: str  # added | modified | removed
    summary: str
    owner: str
    sha256: str | None


def _owner(path: Path) -> str:
    try:
        uid = path.stat().st_uid
    except OSError:
        return "unknown"
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    return {prefix: value}


def yaml_key_changes(old: str, new: str) -> dict[str, list[str]] | None:
    """The dotted keys added, removed and changed between two YAML texts (None: not YAML)."""
    try:
        a, b = _flatten(yaml.safe_load(old) or {}), _flatten(yaml.safe_load(new) or {})
    except yaml.YAMLError:
        return None
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": sorted(k for k in set(a) & set(b) if a[k] != b[k]),
    }


def _keys(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS]) + (
        f" and {len(keys) - _MAX_KEYS} more" if keys[_MAX_KEYS:] else ""
    )
    return f"{label} {shown}"


def diff_summary(old: str, new: str) -> str:
    """``+A -R lines``, and for YAML the keys added/removed/changed (names only, no values)."""
    added = removed = 0
    for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0):
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    parts = [f"+{added} -{removed} lines"]
    keys = yaml_key_changes(old, new)
    if keys is None:
        parts.append("not valid YAML")
    else:
        parts += [_keys(label, found) for label, found in keys.items() if found]
    return "; ".join(parts)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


class ConfigWatch:
    """The watched files (kind → paths) and their snapshot in ``snapshot_dir``."""

    def __init__(self, files: Iterable[tuple[str, Path]], snapshot_dir: Path) -> None:
        self.files = [(kind, Path(p).resolve()) for kind, p in files]
        self.dir = Path(snapshot_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.dir / "snapshot.json"

    def snapshot(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def has_snapshot(self) -> bool:
        return self.path.exists()

    def changes(self) -> list[Change]:
        """Each watched file that differs from the snapshot, in the order watched."""
        snap = self.snapshot()
        out = []
        for kind, path in self.files:
            key = str(path)
            text = _read(path)
            old = snap.get(key)
            if text is None and old is None:
                continue
            digest = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
            if old is not None and old.get("sha256") == digest:
                continue
            if old is None:
                what, summary = "added", f"now watched ({len(text.splitlines())} lines)"
            elif text is None:
                what, summary = "removed", "the file is gone"
            else:
                what, summary = "modified", diff_summary(old.get("text", ""), text)
            out.append(Change(kind, key, what, summary, _owner(path), digest))
        return out

    def save(self, skip: Iterable[str] = ()) -> None:
        """Record the files' current state, except the paths in ``skip`` (kept as they were)."""
        snap, keep = self.snapshot(), set(skip)
        for _, path in self.files:
            key = str(path)
            if key in keep:
                continue
            text = _read(path)
            if text is None:
                snap.pop(key, None)
            else:
                snap[key] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, self.path)

    def requester(self) -> str | None:
        """Who asked for this reload (`beamhub policy reload`'s request file), consumed once."""
        path = self.dir / RELOAD_REQUEST
        try:
            uid = path.stat().st_uid
            data = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return None
        try:
            owner = pwd.getpwuid(uid).pw_name
        except KeyError:
            owner = f"uid {uid}"
        said = str(data.get("user", "")) if isinstance(data, dict) else ""
        return owner if not said or said == owner else f"{owner} (says {said})"

    def reload(self, gateway: Any, trigger: str, requester: str | None = None) -> dict[str, Any]:
        """Audit each change; swap in a changed policy if it passes its tests; save the rest.
        ``requester``: who asked (the admin token's subject for the API); else the request file
        of `beamhub policy reload`, if any."""
        from beamhub.hub.gateway.policy import PolicyError, load_policy
        from beamhub.hub.gateway.policy_tests import failures

        first = not self.has_snapshot()
        if requester is None and trigger != "start":
            requester = self.requester()
        changes = [] if first else self.changes()
        refused: list[str] = []
        result: dict[str, Any] = {"time": time.time(), "trigger": trigger, "changes": []}
        for change in changes:
            outcome, reason = "allow", change.summary
            if change.kind == "policy" and change.what != "removed":
                try:
                    policy = load_policy(change.path)
                    failed = failures(policy)
                except PolicyError as exc:
                    failed = [str(exc)]
                if failed:
                    outcome = "deny"
                    reason = f"{change.summary}; refused, the running policy stays: " + "; ".join(
                        failed
                    )
                    refused.append(change.path)
                else:
                    gateway.policy = policy
                    reason = f"{change.summary}; live, {len(policy.tests)} policy tests pass"
            who = change.owner if requester is None else f"{change.owner}; reload by {requester}"
            self._audit(gateway, change, outcome, reason, who, trigger)
            result["changes"].append(
                {
                    "path": change.path,
                    "kind": change.kind,
                    "what": change.what,
                    "outcome": outcome,
                    "reason": reason,
                    "who": who,
                }
            )
        if first:
            self._audit_baseline(gateway)
        self.save(skip=refused)
        result["refused"] = refused
        tmp = self.dir / (LAST_RELOAD + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, self.dir / LAST_RELOAD)
        return result

    def _audit(
        self, gateway: Any, change: Change, outcome: str, reason: str, who: str, trigger: str
    ) -> None:
        if gateway.audit is None:
            return
        gateway.audit.append(
            user=who,
            action="config.change" if outcome == "allow" else "config.reload",
            resource=f"{change.kind} {change.path} ({change.what})",
            rule=f"reload:{trigger}",
            source="local",
            outcome=outcome,
            status=200 if outcome == "allow" else 409,
            reason=reason,
        )

    def _audit_baseline(self, gateway: Any) -> None:
        if gateway.audit is None:
            return
        present = [(k, p) for k, p in self.files if p.exists()]
        gateway.audit.append(
            user=", ".join(sorted({_owner(p) for _, p in present})) or "unknown",
            action="config.baseline",
            resource=", ".join(f"{k} {p}" for k, p in present),
            rule="reload:start",
            source="local",
            outcome="allow",
            status=200,
            reason=f"first snapshot of {len(present)} watched files; later changes are recorded",
        )
