"""Reference pages generated from the code at build time, so they cannot drift from it.

A page that holds a line ``% beamhub:generate NAME`` gets that line replaced, when Sphinx reads
it, by the MyST text of the generator NAME:

- ``deployment``: every ``beamhub.yaml`` key, from the ``Deployment`` dataclasses of
  ``hub/up/deployment.py`` (types), the embedded defaults ``hub/up/beamhub.default.yaml``
  (default values and their comments) and the ``#:`` comments in the code;
- ``traitlets``: the configurable traits of ``BeamhubAuthenticator`` and ``ReservedNodeSpawner``,
  and which of them ``hub/jupyterhub_config.py`` sets for ``beamhub up``;
- ``enclaves``: the four profiles of ``hub/enclaves/*.yaml`` side by side;
- ``check``: what ``beamhub check --enclave X`` compares, from ``check_deployment`` itself;
- ``errors``: every ``reason`` code the services answer with, found in the source;
- ``openapi``: the gateway's ``hub/gateway/openapi.yaml``;
- ``cli``: ``beamhub --help`` of every subcommand, from the argparse parser.

A generator that fails stops the build naming itself: a reference that no longer matches the
code must be fixed, not published. Pages holding a marker are read again on every build.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^% beamhub:generate (\w+)(?: ([\w.]+))?\s*$", re.MULTILINE)


# --- helpers --------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    """Text for one cell of a pipe table: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    """A value as inline code, as YAML would write it (``""`` for an empty string)."""
    if value is None:
        shown = "null"
    elif isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = json.dumps(value) if value == "" or value.strip() != value else value
    else:
        shown = json.dumps(value, default=str)
    shown = shown.replace("`", "'")
    return f"``{shown}``" if "`" in shown else f"`{shown}`"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key, val = typing.get_args(tp)
        return f"mapping {_type_name(key)} → {_type_name(val)}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
        getattr(tp, "__name__", str(tp)), getattr(tp, "__name__", str(tp))
    )


def yaml_comments(text: str) -> dict[str, str]:
    """Comments of a commented YAML file by dotted key: the comment at the end of the key's line
    with its continuation lines (comment-only lines indented past the key), else the comment
    lines right above the key. PyYAML drops comments; this file's layout is simple enough."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key)
    above: list[str] = []
    last: tuple[str, int] | None = None  # (dotted key, column of its comment)
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            above, last = [], None
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            if last is not None and indent >= last[1] > 0:
                out[last[0]] += " " + stripped.lstrip("#").strip()
            else:
                above.append(stripped.lstrip("#").strip())
                last = None
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w-]*):(.*)$", line)
        if not match:  # a list item or a flow value: not a key of its own
            above, last = [], None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        dotted = ".".join(k for _, k in stack)
        rest = match.group(3)
        hash_at = rest.find(" #")
        if hash_at >= 0:
            out[dotted] = rest[hash_at:].strip().lstrip("#").strip()
            last = (dotted, len(line) - len(rest) + hash_at + 1)
        else:
            last = None
            if above:
                out[dotted] = " ".join(above)
        above = []
    return out


def _attr_docs(module: str) -> dict[tuple[str, str], str]:
    """``#:`` comments of a module's class attributes, as Sphinx's autodoc reads them."""
    from sphinx.pycode import ModuleAnalyzer

    docs = ModuleAnalyzer.for_module(module).find_attr_docs()
    return {key: " ".join(line.strip() for line in lines).strip() for key, lines in docs.items()}


# --- beamhub.yaml ---------------------------------------------------------------------------


def gen_deployment() -> str:
    from beamhub.hub.up import deployment as mod

    defaults_path = mod.default_deployment_path()
    defaults_text = defaults_path.read_text()
    defaults = yaml.safe_load(defaults_text)
    comments = yaml_comments(defaults_text)
    attr_docs = _attr_docs(mod.__name__)
    skip = {"source"}  # set by the loader, not a key of the file

    checks = _deployment_checks(Path(mod.__file__))

    def describe(cls: type, name: str, dotted: str) -> str:
        code = re.sub(r"\bNone\b", "null", attr_docs.get((cls.__name__, name), ""))
        text = code or comments.get(dotted) or _SUPPLEMENT.get(dotted, "")
        if text and not text.endswith("."):
            text += "."
        if dotted in checks:
            text += " Refused with: " + "; ".join(f"“{m}”" for m in checks[dotted]) + "."
        return text.strip()

    def default_of(dotted: str) -> Any:
        node: Any = defaults
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return dataclasses.MISSING
            node = node[part]
        return node

    top_rows: list[list[Any]] = []
    sections: list[str] = []
    hints = typing.get_type_hints(mod.Deployment)
    for f in dataclasses.fields(mod.Deployment):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            top_rows.append(
                [
                    f"`{f.name}`",
                    _type_name(tp),
                    _code(default_of(f.name)),
                    describe(mod.Deployment, f.name, f.name),
                ]
            )
            continue
        intro = describe(mod.Deployment, f.name, f.name) or (tp.__doc__ or "").strip()
        rows = []
        sub_hints = typing.get_type_hints(tp)
        for sub in dataclasses.fields(tp):
            dotted = f"{f.name}.{sub.name}"
            value = default_of(dotted)
            if value is dataclasses.MISSING:
                value = sub.default if sub.default is not dataclasses.MISSING else None
            shown = _code(value)
            if isinstance(value, list) and len(json.dumps(value, default=str)) > 60:
                shown = f"{len(value)} entries (see below)" if value else "`[]`"
            rows.append(
                [
                    f"`{sub.name}`",
                    _type_name(sub_hints[sub.name]),
                    shown,
                    describe(tp, sub.name, dotted),
                ]
            )
        block = [f"### `{f.name}`\n"]
        if intro and not intro.startswith(tp.__name__ + "("):
            block.append(intro + "\n")
        block.append(_table(["key", "type", "default", "meaning"], rows))
        for sub in dataclasses.fields(tp):
            item_tp = typing.get_type_hints(tp)[sub.name]
            args = typing.get_args(item_tp)
            if typing.get_origin(item_tp) is list and args and dataclasses.is_dataclass(args[0]):
                block.append(_items_table(f"{f.name}.{sub.name}", args[0], attr_docs))
        sections.append("\n".join(block))
    out = [
        "## Top level\n",
        _table(["key", "type", "default", "meaning"], top_rows),
        *sections,
    ]
    users = default_of("identity.users")
    if isinstance(users, list) and users:
        out.append(
            "### The embedded dev users\n\n`identity.users` of the embedded defaults (the dev "
            "identity provider's accounts; passwords are for a machine of your own only):\n"
        )
        out.append(
            _table(
                ["username", "factors (`amr`)", "projects", "admin"],
                [
                    [
                        f"`{u['username']}`",
                        ", ".join(u.get("amr", [])),
                        ", ".join(f"{p}: {r}" for p, r in (u.get("projects") or {}).items())
                        or "none",
                        "yes" if u.get("admin") else "",
                    ]
                    for u in users
                ],
            )
        )
    return "\n".join(out)


#: Meanings of keys the code and the embedded defaults leave undescribed (checked against
#: hub/up/stack.py and hub/up/idp.py; a key that is gone from the code drops out of the table).
_SUPPLEMENT = {
    "identity.client_id": "the hub's OAuth client id at the identity provider",
    "identity.token_url": "for an external issuer: its token endpoint",
    "identity.userdata_url": "for an external issuer: its userinfo endpoint",
    "tokens.issuer": "the `iss` claim of project tokens",
    "tokens.audience": "the `aud` claim of project tokens",
    "dsn.enabled": "start the Data Streaming Node",
    "dsn.data_host": "the address the channels' data faces bind on (`beamhub dsn --data-host`)",
    "detector.enabled": "start the simulated detector and its channel",
    "detector.kind": "the detector `beamhub up` starts",
    "detector.channel": "the name of the detector's DSN channel",
    "detector.rate_hz": "frames per second",
    "detector.shape": "frame size in pixels, [rows, columns]",
    "detector.hit_fraction": "fraction of frames that are hits (carry Bragg peaks)",
    "scheduler.nodes": "the scheduler's node count (the local backend's virtual nodes)",
    "gateway.enabled": "start the API gateway (and its audit log)",
    "dashboard.enabled": "start the shared dashboard",
}


def _deployment_checks(path: Path) -> dict[str, list[str]]:
    """Messages of ``DeploymentError("field", "message")`` calls with a literal field name."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "DeploymentError"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            message = _message_text(node.args[1])
            if message and message not in found.setdefault(node.args[0].value, []):
                found[node.args[0].value].append(message)
    return found


def _items_table(dotted: str, cls: type, attr_docs: dict[tuple[str, str], str]) -> str:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = _code(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _code(f.default_factory())
        else:
            default = "required"
        rows.append(
            [
                f"`{f.name}`",
                _type_name(hints[f.name]),
                default,
                attr_docs.get((cls.__name__, f.name), ""),
            ]
        )
    return f"Each entry of `{dotted}`:\n\n" + _table(["key", "type", "default", "meaning"], rows)


# --- traitlets ------------------------------------------------------------------------------


def _configured_by_up() -> dict[str, set[str]]:
    """Traits ``hub/jupyterhub_config.py`` assigns, by class name (``a = c.X`` aliases too)."""
    tree = ast.parse((REPO / "hub" / "jupyterhub_config.py").read_text())
    aliases: dict[str, str] = {}
    found: dict[str, set[str]] = {}

    def class_of(node: ast.AST) -> str | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "c":
                return node.attr
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and (cls := class_of(node.value)):
                aliases[target.id] = cls
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and (cls := class_of(target.value)):
                    found.setdefault(cls, set()).add(target.attr)
    return found


def _trait_type(trait: Any) -> str:
    name = type(trait).__name__
    values = getattr(trait, "values", None)
    if values:
        return f"{name} ({', '.join(map(str, values))})"
    return name


def _trait_default(cls: type, name: str, trait: Any) -> str:
    if any(
        getattr(v, "trait_name", None) == name and type(v).__name__ == "DefaultHandler"
        for klass in cls.__mro__
        for v in vars(klass).values()
    ):
        return "computed (see below)"
    try:
        return _code(trait.default())
    except Exception:
        return _code(trait.default_value)


def _traitlets_section(cls: type, set_by_up: set[str], extra: set[str]) -> str:
    own = cls.class_own_traits(config=True)
    entries = []
    for name, trait in sorted(own.items()):
        help_text = " ".join(textwrap.dedent(trait.help or "").split())
        facts = [_trait_type(trait), f"default {_trait_default(cls, name, trait)}"]
        if name in set_by_up or name in extra:
            facts.append("set by `beamhub up`")
        entries.append(
            f"`{cls.__name__}.{name}` · {' · '.join(facts)}\n: {help_text or '(no help)'}\n"
        )
    changed = sorted(
        {
            v.trait_name
            for v in vars(cls).values()
            if type(v).__name__ == "DefaultHandler" and v.trait_name not in own
        }
    )
    base = cls.__mro__[1]
    text = [
        f"## `{cls.__name__}`\n",
        f"`{cls.__module__}.{cls.__name__}`, a subclass of `{base.__module__}.{base.__name__}` "
        f"(whose options apply as well). {(cls.__doc__ or '').strip()}\n",
        "\n".join(entries),
    ]
    if changed:
        text.append(
            f"Defaults this class changes from `{base.__name__}`: "
            + ", ".join(f"`{n}`" for n in changed)
            + ".\n"
        )
    return "\n".join(text)


def gen_traitlets() -> str:
    from beamhub.hub.authenticator import BeamhubAuthenticator
    from beamhub.hub.up.deployment import TenancyConfig
    from beamhub.kernels.spawner import ReservedNodeSpawner

    set_by_up = _configured_by_up()
    tenancy_keys = set(TenancyConfig().spawner_options(0))  # set from beamhub.yaml `tenancy:`
    return "\n".join(
        [
            _traitlets_section(
                BeamhubAuthenticator, set_by_up.get("BeamhubAuthenticator", set()), set()
            ),
            _traitlets_section(
                ReservedNodeSpawner, set_by_up.get("ReservedNodeSpawner", set()), tenancy_keys
            ),
        ]
    )


# --- enclaves and beamhub check ---------------------------------------------------------------


def _profile_field_meanings() -> dict[str, str]:
    """The field list in dev.yaml's header comment: ``#   name   meaning``."""
    from beamhub.hub.enclave import ENCLAVE_DIR

    meanings = {}
    for line in (ENCLAVE_DIR / "dev.yaml").read_text().splitlines():
        match = re.match(r"^#\s{2,}(\w+)\s{2,}(.+)$", line)
        if match:
            meanings[match.group(1)] = match.group(2).strip()
    return meanings


def gen_enclaves() -> str:
    from beamhub.hub.enclave import ENCLAVE_DIR, ENCLAVE_NAMES

    docs = {n: yaml.safe_load((ENCLAVE_DIR / f"{n}.yaml").read_text()) for n in ENCLAVE_NAMES}
    meanings = _profile_field_meanings()
    fields = [k for k in docs["dev"] if k not in ("name", "description")]
    for doc in docs.values():
        fields += [k for k in doc if k not in fields and k not in ("name", "description")]

    def show(value: Any) -> str:
        if isinstance(value, dict):
            return "; ".join(f"{k}: {show(v)}" for k, v in value.items())
        if isinstance(value, list):
            return ", ".join(map(str, value))
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    rows = [[f"`{f}`", *(show(docs[n].get(f, "")) for n in ENCLAVE_NAMES)] for f in fields]
    head = ["field", *ENCLAVE_NAMES]
    described = "\n".join(f"- **{n}**: {docs[n].get('description', '')}" for n in ENCLAVE_NAMES)
    legend = "\n".join(f"`{f}`\n: {meanings[f]}\n" for f in fields if f in meanings)
    return described + "\n\n" + _table(head, rows) + "\nThe fields:\n\n" + legend


def gen_check() -> str:
    from beamhub.hub.enclave import ENCLAVE_NAMES, check_deployment, load_profile
    from beamhub.hub.up.deployment import load_deployment

    dep = load_deployment(None)
    names: list[str] = []
    per: dict[str, dict[str, Any]] = {}
    for enclave in ENCLAVE_NAMES:
        for req in check_deployment(dep, load_profile(enclave), None):
            if req.name not in per:
                names.append(req.name)
                per[req.name] = {}
            per[req.name][enclave] = req.required
            per[req.name]["fix"] = req.fix  # the strictest enclave's wording wins
    out = []
    for n in names:
        present = [e for e in ENCLAVE_NAMES if e in per[n]]
        if len({per[n][e] for e in present}) == 1:
            asked = f"**{', '.join(present)}**: {per[n][present[0]]}"
        else:
            asked = "; ".join(f"**{e}**: {per[n][e]}" for e in present)
        absent = [e for e in ENCLAVE_NAMES if e not in per[n]]
        if absent:
            asked += f"; not asked by {', '.join(absent)}"
        fix = per[n]["fix"].replace("[]", "[…]")  # the list it prints names what fails
        out.append(f"`{n}`\n: {asked}.\n\n  On FAIL (as printed for leadership): {fix}\n")
    return "\n".join(out)


# --- error reasons ----------------------------------------------------------------------------

#: where each source folder's errors are met
_SERVICE = [
    ("auth/tokens.py", "any service, verifying a project token"),
    ("auth/jwks.py", "any service, verifying a project token"),
    ("auth/api.py", "any beamhub HTTP service"),
    ("hub/gateway/", "API gateway"),
    ("hub/tokens/", "token service"),
    ("kernels/jobs_handler.py", "hub jobs API"),
    ("kernels/", "scheduler"),
    ("streaming/source_control.py", "source control endpoint"),
    ("streaming/template", "DSN (channel template)"),
    ("streaming/", "DSN"),
    ("widgets/dashboard", "dashboard"),
    ("widgets/", "widgets"),
]
#: error constructors whose arguments are (status?, reason, message, ...)
_ERROR_CALLS = {
    "ApiError",
    "TokenError",
    "ChannelError",
    "MintRefused",
    "SpawnRefused",
    "_refuse",
    "TemplateViolation",
}
#: helpers that build an error with a fixed status from (reason, ...)
_ERROR_HELPERS = {"unavailable": 503}


def _service_of(path: str) -> str:
    return next((name for prefix, name in _SERVICE if path.startswith(prefix)), path)


def _message_text(node: ast.AST) -> str | None:
    """A message argument as a person reads it: f-string fields shown as ``…``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message_text(node.left), _message_text(node.right)
        if left is not None and right is not None:
            return left + right
    if isinstance(node, ast.Subscript):  # f"..."[:200]
        return _message_text(node.value)
    return None


def _constant(node: ast.AST | None, default: Any) -> Any:
    return node.value if isinstance(node, ast.Constant) else default


def scan_errors(root: Path = REPO) -> dict[str, dict[str, Any]]:
    """reason -> {statuses, services, messages} for every literal reason in the source."""
    found: dict[str, dict[str, Any]] = {}
    for folder in ("auth", "hub", "kernels", "streaming", "widgets"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = getattr(func, "id", None) or getattr(func, "attr", None)
                if name not in _ERROR_CALLS and name not in _ERROR_HELPERS:
                    continue
                args = list(node.args)
                kwargs = {k.arg: k.value for k in node.keywords if k.arg}
                status = _ERROR_HELPERS.get(name)
                if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, int):
                    status = args.pop(0).value
                if isinstance(kwargs.get("status_code"), ast.Constant):
                    status = kwargs["status_code"].value
                if name == "TemplateViolation":  # (field, limit, message, status=400, reason=)
                    status = _constant(kwargs.get("status"), 400)
                    reason_node = kwargs.get("reason") or ast.Constant("invalid")
                    message_node = args[2] if len(args) > 2 else kwargs.get("message")
                else:
                    positional = args.pop(0) if name != "SpawnRefused" and args else None
                    reason_node = kwargs.get("reason") or positional
                    message_node = args[0] if args else kwargs.get("message")
                if not (
                    isinstance(reason_node, ast.Constant) and isinstance(reason_node.value, str)
                ):
                    continue
                entry = found.setdefault(
                    reason_node.value, {"statuses": set(), "services": set(), "messages": []}
                )
                if status is not None:
                    entry["statuses"].add(status)
                entry["services"].add(_service_of(rel))
                text = _message_text(message_node) if message_node is not None else None
                if text and text not in entry["messages"]:
                    entry["messages"].append(text)
    return found


def gen_errors() -> str:
    """One section per reason code, labelled ``reason-<code>`` for links from other pages."""
    found = scan_errors()
    out = [
        f"{len(found)} reason codes, found in the source when this page was built; `…` stands "
        "for a value filled in at run time.\n",
        " · ".join(f"{{ref}}`{r} <reason-{r}>`" for r in sorted(found)) + "\n",
    ]
    for reason in sorted(found):
        entry = found[reason]
        statuses = ", ".join(str(s) for s in sorted(entry["statuses"])) or "the status of the cause"
        out.append(f"(reason-{reason})=\n## `{reason}`\n")
        out.append(f"HTTP {statuses} · {', '.join(sorted(entry['services']))}\n")
        if entry["messages"]:
            out += [f"- “{' '.join(m.split())}”" for m in entry["messages"]]
        else:
            out.append("- the message of the error it passes on")
        out.append("")
    return "\n".join(out)


# --- the gateway's OpenAPI document ---------------------------------------------------------------


def _schema_text(schema: Any, components: dict[str, Any], depth: int = 0) -> str:
    if not isinstance(schema, dict):
        return str(schema)
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    for key in ("oneOf", "anyOf", "allOf"):
        if key in schema:
            word = {"oneOf": " or ", "anyOf": " or ", "allOf": " and "}[key]
            return word.join(_schema_text(s, components, depth) for s in schema[key])
    if "type" not in schema and "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        return f"array of {_schema_text(schema.get('items', {}), components, depth)}"
    if kind == "object" and "properties" in schema and depth < 1:
        required = set(schema.get("required", []))
        parts = [
            f"{name}{'' if name in required else '?'}: {_schema_text(sub, components, depth + 1)}"
            for name, sub in schema["properties"].items()
        ]
        return "{" + ", ".join(parts) + "}"
    extra = []
    if "enum" in schema:
        extra.append("one of " + ", ".join(map(str, schema["enum"])))
    for key, word in (("minimum", "≥"), ("maximum", "≤"), ("maxLength", "length ≤")):
        if key in schema:
            extra.append(f"{word} {schema[key]}")
    if "pattern" in schema:
        extra.append(f"pattern {schema['pattern']}")
    return kind + (f" ({'; '.join(extra)})" if extra else "")


def _ref_name(node: Any) -> str | None:
    if isinstance(node, dict) and isinstance(node.get("$ref"), str):
        return node["$ref"].rsplit("/", 1)[-1]
    return None


def _json_schema_of(content: Any) -> Any:
    if isinstance(content, dict):
        return (content.get("application/json") or {}).get("schema")
    return None


def gen_openapi() -> str:
    doc = yaml.safe_load((REPO / "hub" / "gateway" / "openapi.yaml").read_text())
    components = doc.get("components", {})
    params = components.get("parameters", {})
    info = doc.get("info", {})
    out = [
        f"**{info.get('title', 'API')}**, version {info.get('version', '?')} (OpenAPI "
        f"{doc.get('openapi', '?')}). Base path: "
        + ", ".join(f"`{s.get('url')}`" for s in doc.get("servers", []))
        + " under the gateway, i.e. `/services/gateway/api/v1` behind the hub's proxy.\n",
        " ".join(str(info.get("description", "")).split()) + "\n",
    ]
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method not in ("get", "put", "post", "delete", "patch"):
                continue
            out.append(f"## `{method.upper()} {path}`\n")
            summary = " ".join(str(op.get("summary") or "").split())
            description = " ".join(str(op.get("description", "")).split())
            if summary:
                out.append(summary[0].upper() + summary[1:].rstrip(".") + ".\n")
            if description:
                out.append(description + "\n")
            secured = op.get("security", doc.get("security"))
            facts = ["project token (`Authorization: Bearer …`)" if secured else "no token"]
            if "x-action" in op:
                facts.append(f"policy action `{op['x-action']}`")
            out.append("- " + "; ".join(facts))
            for p in [*item.get("parameters", []), *op.get("parameters", [])]:
                p = params.get(_ref_name(p) or "", p)
                out.append(
                    f"- {p.get('in', '?')} parameter `{p.get('name', '?')}`: "
                    f"{p.get('description', '')} "
                    f"({_cell(_schema_text(p.get('schema', {}), components))})"
                )
            body = _json_schema_of(op.get("requestBody", {}).get("content"))
            body_name = _ref_name(body) or op.get("x-body")
            if body_name:
                out.append(f"- body: {{ref}}`{body_name} <api-schema-{body_name}>`")
            elif body:
                out.append(f"- body: `{_cell(_schema_text(body, components))}`")
            for status, response in op.get("responses", {}).items():
                shared = _ref_name(response)
                if shared:
                    out.append(f"- `{status}`: {{ref}}`{shared} <api-response-{shared}>`")
                    continue
                desc = " ".join(str(response.get("description", "")).split())
                schema = _ref_name(_json_schema_of(response.get("content")))
                if schema:
                    desc += f" ({{ref}}`{schema} <api-schema-{schema}>`)"
                out.append(f"- `{status}`: {desc}")
            out.append("")
    responses = components.get("responses", {})
    if responses:
        out.append("## Shared responses\n")
        for name, response in responses.items():
            out.append(f"(api-response-{name})=\n### `{name}`\n")
            out.append(" ".join(str(response.get("description", "")).split()) + "\n")
    schemas = components.get("schemas", {})
    if schemas:
        out.append("## Schemas\n")
        for name, schema in schemas.items():
            out.append(f"(api-schema-{name})=\n### `{name}`\n")
            if schema.get("description"):
                out.append(" ".join(str(schema["description"]).split()) + "\n")
            props = schema.get("properties")
            if not props:
                out.append(f"`{_cell(_schema_text(schema, components))}`\n")
                continue
            required = set(schema.get("required", []))
            rows = [
                [
                    f"`{prop}`",
                    _schema_text({k: v for k, v in sub.items() if k != "properties"}, components)
                    if isinstance(sub, dict)
                    else str(sub),
                    "yes" if prop in required else "",
                    " ".join(str(sub.get("description", "")).split())
                    if isinstance(sub, dict)
                    else "",
                ]
                for prop, sub in props.items()
            ]
            out.append(_table(["property", "type", "required", "meaning"], rows))
            if schema.get("additionalProperties") is False:
                out.append("Other properties are refused (`unknown_field`).\n")
    return "\n".join(out)


# --- CLI --------------------------------------------------------------------------------------


def gen_cli() -> str:
    import argparse

    from beamhub.hub.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps its help to the terminal's width
    out: list[str] = []

    def walk(parser: argparse.ArgumentParser, prog: str, level: int) -> None:
        out.append(f"{'#' * level} `{prog}`\n")
        out.append("```text\n" + parser.format_help().rstrip() + "\n```\n")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prog} {name}", min(level + 1, 4))

    parser = build_parser()
    parser.prog = "beamhub"
    walk(parser, "beamhub", 2)
    return "\n".join(out)


def gen_tiers() -> str:
    """The built-in QoS tiers (kernels/tiers.yaml) with its header's field meanings, and the
    slurm.conf partitions the SLURM backend derives from them."""
    from beamhub.kernels.slurm_text import partition_lines
    from beamhub.kernels.tiers import load_tiers

    path = REPO / "kernels" / "tiers.yaml"
    text = path.read_text()
    meanings = {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^#\s{2,}(\w+)\s{2,}(.+)$", text, re.MULTILINE)
    }
    doc = yaml.safe_load(text)
    fields = list(meanings) or sorted({k for t in doc["tiers"].values() for k in t})

    def show(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "—"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    rows = [
        [f"`{name}`", *(show(tier.get(f, "")) for f in fields)]
        for name, tier in doc["tiers"].items()
    ]
    head = ["tier", *(f"`{f}`" for f in fields)]
    legend = "\n".join(f"- `{f}`: {meanings[f]}" for f in fields if f in meanings)
    lines = "\n".join(partition_lines(load_tiers(None)))
    return (
        f"The default tier is `{doc.get('default_tier')}`.\n\n"
        + _table(head, rows)
        + "\n"
        + legend
        + "\n\nThe SLURM partitions for these tiers (`python -m beamhub.kernels.slurm partitions`):"
        + "\n\n```text\n"
        + lines
        + "\n```\n"
    )


def gen_doc(dotted: str) -> str:
    """The docstring of a module-level object, e.g. ``beamhub.auth.home.state_dir``, as a quote."""
    import importlib
    import inspect

    module, _, name = dotted.rpartition(".")
    doc = inspect.getdoc(getattr(importlib.import_module(module), name))
    if not doc:
        raise ValueError(f"{dotted} has no docstring")
    return "> " + " ".join(doc.split()) + "\n"


GENERATORS: dict[str, Callable[..., str]] = {
    "doc": gen_doc,
    "tiers": gen_tiers,
    "deployment": gen_deployment,
    "traitlets": gen_traitlets,
    "enclaves": gen_enclaves,
    "check": gen_check,
    "errors": gen_errors,
    "openapi": gen_openapi,
    "cli": gen_cli,
}


# --- Sphinx -----------------------------------------------------------------------------------


class GeneratorError(RuntimeError):
    """A generator could not run against the code: the reference page must be fixed."""


def expand(text: str, docname: str = "?") -> str:
    """``text`` with every marker replaced by its generator's output."""

    def one(match: re.Match[str]) -> str:
        name, argument = match.group(1), match.group(2)
        if name not in GENERATORS:
            raise GeneratorError(
                f"{docname}: unknown generator {name!r}; known: {', '.join(GENERATORS)}"
            )
        try:
            return GENERATORS[name](*([argument] if argument else []))
        except Exception as exc:
            raise GeneratorError(
                f"{docname}: the {name!r} generator (docs/_ext/beamhub_docs.py) failed against "
                f"the code: {type(exc).__name__}: {exc}; update the generator"
            ) from exc

    return MARKER.sub(one, text)


def _source_read(app: Any, docname: str, source: list[str]) -> None:
    if MARKER.search(source[0]):
        source[0] = expand(source[0], docname)


def _always_outdated(app: Any, env: Any, added: set, changed: set, removed: set) -> list[str]:
    """Pages with a marker are read again on every build: the code may have changed."""
    pages = []
    for docname in env.found_docs:
        path = Path(env.doc2path(docname))
        if path.suffix == ".md" and path.exists() and MARKER.search(path.read_text()):
            pages.append(docname)
    return pages


def setup(app: Any) -> dict[str, Any]:
    app.connect("source-read", _source_read)
    app.connect("env-get-outdated", _always_outdated)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
